"""Prompts as data: every prompt has an id, configs pick ids, manifests record them.

Changing a prompt's text means adding a new id (``describe_v2``) and pointing the config at it, so
the stage key changes and the old results stay readable next to the new ones.
"""

from __future__ import annotations

# Text-to-image prompt templates for the far/near branch: ``{label}`` is the outlier label.
T2I_TEMPLATES: dict[str, str] = {
    "photo": "a photo of a {label}.",
    "photo_hq": "a high quality photo of a {label}.",
    "plain": "{label}",
}

# Multi-round elaboration prompts (one multi-turn chat per generated image).
# round 1: free description; round 2: is an ID class visible (yes/no); round 3: one outlier label.
ELABORATE_PROMPTS: dict[str, str] = {
    "describe_v1": "Describe what this image shows in one sentence.",
    "describe_v2": "What is the main object or scene in this image? Answer in one short sentence.",
    "id_visible_source_v1": "Is a {classes} visible in this image? Answer only yes or no.",
    "id_visible_any_v1": "Is any of these visible in this image: {classes}? Answer only yes or no.",
    "label_v1": (
        "Name the main object or scene of this image with one short label of at most {max_words} "
        "words. Answer with the label only."
    ),
}


# Multi-OS text-modality synthesis (one question per candidate): {a} and {b} are known concepts
# (an ID class and another known concept), {max_words} bounds the answer's label.
MULTI_OS_PROMPTS: dict[str, str] = {
    "mos_interpolate_v1": (
        "Invent a new kind of object or scene that lies halfway between a {a} and a {b} but is neither of "
        "them. Answer with its name only, at most {max_words} words."
    ),
    "mos_counterfactual_v1": (
        "Imagine a {a} changed so much that it is no longer a {a} but a different, unusual thing. "
        "Answer with the name of that thing only, at most {max_words} words."
    ),
}

def check_prompt_id(table: dict[str, str], prompt_id: str, key: str) -> str:
    """``prompt_id`` if ``table`` has it, else a ValueError naming the config key and the known ids."""
    if prompt_id not in table:
        raise ValueError(f"{key}: unknown prompt id '{prompt_id}' (known: {', '.join(sorted(table))})")
    return prompt_id


# Sketch questions (EOE's far / near / fine tasks, SynOOD's context), as functions of their inputs
# so that the stage and anything that must ask them identically (the world MLLM's training
# dialogues) share one text.
def far_opening(classnames: list[str]) -> str:
    return (f"Here are {len(classnames)} image class labels: {', '.join(classnames)}. "
            "Summarise the broad visual categories these labels belong to.")


def far_request(n: int, more: bool, max_words: int) -> str:
    ask = "more, different " if more else ""
    return (f"List {n} {ask}labels of objects or scenes that look like these categories but are unrelated "
            f"to every label above. At most {max_words} words each, one per line, no explanations.")


def fine_request(classnames: list[str], n: int, max_words: int) -> str:
    return (f"Here are {len(classnames)} image classes that are all kinds of one category: {', '.join(classnames)}. "
            f"List {n} other kinds of the same category that are not in this list. "
            f"At most {max_words} words each, one per line, no explanations.")


def near_request(name: str, n: int, max_words: int, with_images: bool) -> str:
    return (f"{'These images show' if with_images else 'Think of'} a {name}. "
            f"List {n} labels of things from other domains that look visually similar "
            f"to a {name} but are not a {name}. At most {max_words} words each, one per line.")


def context_request(class_name: str) -> str:
    return ("Describe the surroundings and background of this image in one short phrase, "
            f"without mentioning the {class_name} or any other main subject.")
