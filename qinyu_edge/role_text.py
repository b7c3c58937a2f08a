"""The role description VoiceDesign reads: checked, then normalised exactly as upstream trained it.

Upstream (`VoiceDesign/models/flow/text_encoder.py`) rewrites the semi-structured form
该角色是一个「A」年「G」性， 性格「P」 into "AG性，性格P。"; any other text loses the template prefix,
every 年 and 性 character and the 「」 brackets, and an empty result becomes 一个通用角色。. That second
rule mangles free text (性格 -> 格), but the checkpoint was trained on its output, so it is kept.
"""

from __future__ import annotations

import re

from .errors import QinyuError

MAX_ROLE_CHARS = 400  # a few sentences; the encoder truncates at 512 tokens anyway
_TEMPLATE = re.compile(r"该角色是一个「(.*?)」年「(.*?)」性， 性格「(.*?)」")
_FALLBACK = "一个通用角色。"


class RoleTextError(QinyuError):
    """A role description that cannot design a voice."""


def check_role(text: str) -> str:
    stripped = (text or "").strip()
    if not stripped:
        raise RoleTextError('the role description is empty: describe the character, e.g. --role "a gentle '
                            'snack-shop owner with a warm, low voice" (Chinese, as the model was trained, works best)')
    if len(stripped) > MAX_ROLE_CHARS:
        raise RoleTextError(f"the role description has {len(stripped)} characters, more than {MAX_ROLE_CHARS}: "
                            "keep to age, gender, personality and identity in a few sentences")
    return stripped


def normalise_role(text: str) -> str:
    match = _TEMPLATE.search(text)
    if match:
        age, gender, personality = (g.strip() for g in match.groups())
        parts = ([f"{age}年{gender}性"] if age and gender else []) + ([f"性格{personality}"] if personality else [])
        return ("，".join(parts) + "。").replace("，，", "，")
    cleaned = text.replace("该角色是一个", "").replace("年", "").replace("性", "")
    cleaned = re.sub(r"[「」]", "", cleaned).strip()
    return cleaned or _FALLBACK
