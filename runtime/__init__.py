"""Device side, torch-free: sessions, frontend, generation, streaming decode, the voice loop."""
