"""The ``math`` verifier: extract a final answer and compare it with the reference.

Extraction (in order): the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested
braces honoured); else the last "answer is X"; else the last number in the
text.  Comparison: after normalization (``$``, ``\\left``/``\\right``,
``\\text{}``, ``\\dfrac``/``\\tfrac``, thousands separators, degrees, spaces),
equal strings; else equal numbers (integers, decimals, fractions ``a/b``,
``\\frac{a}{b}``, percentages either as the number or its hundredth) within a
relative tolerance of 1e-6; else symbolic equivalence via sympy
(``simplify(a − b) == 0``).  Callers run this under a timeout (sympy can be slow
on hostile input).
"""

from __future__ import annotations

import re
from fractions import Fraction

REL_TOL = 1e-6
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _braced(text: str, open_at: int) -> str | None:
    """The content of the brace group starting at ``text[open_at] == '{'``."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer written in ``text``, or None."""
    for command in ("\\boxed", "\\fbox"):
        at = text.rfind(command + "{")
        if at >= 0:
            content = _braced(text, at + len(command))
            if content is not None:
                return content.strip()
    matches = re.findall(r"answer is[:\s]*(.+?)(?:\.\s|\.$|\n|$)", text, flags=re.IGNORECASE)
    if matches:
        return matches[-1].strip().strip("$ ")
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize(answer: str) -> str:
    s = answer.strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\mathrm\{([^{}]*)\}", r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""),
                     ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""),
                     ("\\%", "%"), ("$", ""), ("\\$", "")):
        s = s.replace(old, new)
    s = s.replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _frac_to_plain(s: str) -> str:
    """``\\frac{a}{b}`` → ``((a)/(b))``, innermost first; ``\\frac12`` → ``((1)/(2))``."""
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    while (at := s.find("\\frac{")) >= 0:
        num = _braced(s, at + 5)
        if num is None:
            break
        den_at = at + 5 + len(num) + 2
        if den_at >= len(s) or s[den_at] != "{":
            break
        den = _braced(s, den_at)
        if den is None:
            break
        s = s[:at] + f"(({num})/({den}))" + s[den_at + len(den) + 2 :]
    return s


def to_number(answer: str) -> Fraction | float | None:
    """A numeric value of a normalized answer, or None."""
    s = answer.rstrip("%")
    s = _frac_to_plain(s)
    m = re.fullmatch(r"\(?\(?(-?\d+(?:\.\d+)?)\)?/\(?(-?\d+(?:\.\d+)?)\)?\)?", s)
    try:
        if m:
            den = Fraction(m.group(2))
            return Fraction(m.group(1)) / den if den else None
        if re.fullmatch(r"-?\d+(?:\.\d+)?|-?\.\d+", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _numbers_equal(a: Fraction | float, b: Fraction | float) -> bool:
    return abs(a - b) <= REL_TOL * max(1.0, abs(float(a)), abs(float(b)))


def _to_sympy(answer: str):
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    s = _frac_to_plain(answer)
    s = re.sub(r"\\sqrt\[(\w+)\]\{([^{}]*)\}", r"root(\2,\1)", s)
    s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = re.sub(r"\\sqrt(\d)", r"sqrt(\1)", s)
    for old, new in (("\\cdot", "*"), ("\\times", "*"), ("\\pi", "pi"), ("{", "("), ("}", ")"), ("\\", "")):
        s = s.replace(old, new)
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    return parse_expr(s, transformations=transformations, evaluate=True, local_dict={"e": sympy.E})


def verify_math(completion: str, gold: str) -> tuple[bool, str]:
    """(correct, verdict) for a completion against the reference answer."""
    predicted = extract_answer(completion)
    if predicted is None:
        return False, "no answer found"
    p, g = normalize(predicted), normalize(str(gold))
    if p == g:
        return True, f"match: {p}"
    pn, gn = to_number(p), to_number(g)
    if pn is not None and gn is not None:
        if _numbers_equal(pn, gn):
            return True, f"numeric match: {p} = {g}"
        if (p.endswith("%") or g.endswith("%")) and (
            _numbers_equal(pn / 100 if p.endswith("%") else pn, gn / 100 if g.endswith("%") else gn)
        ):
            return True, f"percent match: {p} = {g}"
        return False, f"numeric mismatch: {p} vs {g}"
    try:
        import sympy

        if sympy.simplify(_to_sympy(p) - _to_sympy(g)) == 0:
            return True, f"symbolic match: {p} = {g}"
    except Exception:  # noqa: BLE001 - unparsable answers simply do not match
        pass
    return False, f"mismatch: {p} vs {g}"
