"""Read a Dockerfile as Docker reads it, and refuse every stage source but the base.

``rbd build`` promises that no node pulls anything during a build: every
stage starts from the distributed base (``--base``) or an earlier stage, and
nothing is copied or mounted from any other image. A check that reads the file
differently from Docker can be fooled -- with ``# escape=`` set to a backtick,
a line ending in ``\\`` is *not* continued, so a naive reader joined a second
``FROM alpine`` onto the line before it and let it through. So this module
follows Docker's own parser (moby/buildkit ``frontend/dockerfile/parser``):

* **Parser directives** at the very top (``# escape=``, ``# syntax=``,
  ``# check=``), read until the first line that is not one (a blank line, a
  comment, an unknown directive or an instruction ends them); a repeated
  directive is an error, as in Docker. ``# syntax=`` is refused: it makes
  BuildKit pull a frontend image.
* **Line continuations** with the escape character (``\\`` or the backtick)
  at the end of a line, trailing blanks allowed; comment lines inside a
  continuation are dropped and blank ones skipped, as Docker does.
* **Stage sources**: every ``FROM`` (its ``--platform`` is refused: a
  platform other than the base's own makes the engine pull; ``AS name``
  declares a stage), ``COPY --from=`` (and ``ADD --from=``, which Docker
  rejects anyway), and ``RUN --mount=...,from=``; ``ONBUILD`` triggers are
  checked the same way. A source must be the base, an earlier stage's name, or
  an earlier stage's index.
* **Variables**: a ``FROM`` naming its image through an ``ARG`` (``$B``,
  ``${B}``) is refused, and the message says what the global ARG's default
  would make it; variables in ``--from`` are refused too. rbd passes no build
  args, but a second reader of Docker's quoting and escaping rules is one more
  way to disagree with Docker: the name must be written literally.

Where Docker versions differ, both readings are checked and either one's
refusal counts: older engines continue a line ending in an escaped escape
(``\\``) and do not know the ``check`` directive (so a ``# check=`` line ends
the directives there). Whitespace is Go's (``unicode.IsSpace``), lines end at
``\n`` only, as in Docker. Heredocs (BuildKit) are not interpreted: their lines
are read as instructions, which can only refuse more, never less. Values with
quotes in ``--mount`` are refused rather than unquoted by a second, possibly
different, reader. Errors
name the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rainbowd.lib.buildcontext import ContextError, normalize_ref

#: the directives Docker knows (older engines: no "check"); any other ends the directives
DIRECTIVES = ("syntax", "escape", "check")
LEGACY_DIRECTIVES = ("syntax", "escape")
#: Go's regexp \s is [\t\n\f\r ]
_DIRECTIVE = re.compile(
    r"^#[\t\n\f\r ]*([a-zA-Z][a-zA-Z0-9]*)[\t\n\f\r ]*=[\t\n\f\r ]*(.+?)[\t\n\f\r ]*\Z"
)
#: Go's unicode.IsSpace (Python's str.isspace also counts \x1c-\x1f, which Go does not)
GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
#: what splits an instruction from its arguments (Docker's reWhitespace)
_COMMAND_SPACE = re.compile(r"[\t\v\f\r ]+")
#: what an ARG default must look like to be shown in a message (a plain image ref)
_PLAIN_REF = re.compile(r"[A-Za-z0-9._:/@-]+")
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_INDEX = re.compile(r"[0-9]+")
#: longest Dockerfile read (characters): a build context is small (buildcontext.py)
MAX_DOCKERFILE = 1024 * 1024


@dataclass(frozen=True)
class Instruction:
    """One logical instruction: where it starts, its keyword (upper case), its arguments."""

    line: int
    keyword: str
    args: str

    def where(self) -> str:
        return f"Dockerfile line {self.line}: {self.keyword} {_short(self.args)}"


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse(text: str, *, legacy: bool = False) -> tuple[dict[str, str], list[Instruction]]:
    """(parser directives, instructions) of ``text``, read as Docker reads it.

    ``legacy``: as engines before BuildKit 0.10 read it (no ``check``
    directive; a line ending in an escaped escape is still continued).
    """
    if len(text) > MAX_DOCKERFILE:
        raise ContextError(f"Dockerfile is larger than {MAX_DOCKERFILE} characters")
    lines = [raw.rstrip("\r\n") for raw in text.removeprefix("\ufeff").split("\n")]
    known = LEGACY_DIRECTIVES if legacy else DIRECTIVES
    directives: dict[str, str] = {}
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i].lstrip(GO_SPACE))
        if match is None or match.group(1).lower() not in known:
            break
        key = match.group(1).lower()
        if key in directives:
            raise ContextError(
                f"Dockerfile line {i + 1}: only one {key} parser directive can be used"
            )
        directives[key] = match.group(2)
        i += 1
    escape = directives.get("escape", "\\")
    if escape not in ("\\", "`"):
        raise ContextError(
            f"Dockerfile: escape parser directive {escape!r} is invalid; use \\ or `"
        )
    e = re.escape(escape)
    if legacy:
        continuation = re.compile(e + r"[ \t]*\Z")
    else:
        continuation = re.compile(r"(?:(?<=[^" + e + r"])|^)" + e + r"[ \t]*\Z")
    out: list[Instruction] = []
    while i < len(lines):
        start = i
        line = lines[i].lstrip(GO_SPACE)
        i += 1
        if line.startswith("#"):
            continue
        joined, more = _continued(line, continuation)
        if more and not joined:
            continue  # an escape alone on a line
        if not more and not joined:
            continue  # a blank line
        while more and i < len(lines):
            nxt = lines[i]
            i += 1
            if nxt.lstrip(GO_SPACE).startswith("#"):
                continue  # comment lines inside a continuation are dropped
            if not nxt.lstrip(GO_SPACE):
                continue  # so are blank ones (Docker warns)
            part, more = _continued(nxt, continuation)
            joined += part
        words = _COMMAND_SPACE.split(joined.strip(GO_SPACE), maxsplit=1)
        args = words[1] if len(words) == 2 else ""
        out.append(Instruction(start + 1, words[0].upper(), args))
    return directives, out


def _continued(line: str, continuation: re.Pattern[str]) -> tuple[str, bool]:
    match = continuation.search(line)
    if match is None:
        return line, False
    return line[: match.start()], True


def builder_flags(args: str) -> tuple[list[tuple[str, str | None]], str]:
    """Leading ``--name[=value]`` flags of an instruction (quotes and \\ as Docker reads them).

    Returns ((name, value or None), the rest of the arguments).
    """
    flags: list[str] = []
    pos, n = 0, len(args)
    while True:
        while pos < n and args[pos] in GO_SPACE:
            pos += 1
        if not args.startswith("--", pos):
            rest = args[pos:]
            break
        word, quote, blank_ok = "", "", False
        while pos < n:
            ch = args[pos]
            if quote:
                if ch == quote:
                    quote = ""
                elif ch == "\\":
                    pos += 1
                    if pos < n:
                        word += args[pos]
                else:
                    word += ch
            elif ch in GO_SPACE:
                break
            elif ch in "'\"":
                quote, blank_ok = ch, True
            elif ch == "\\":
                pos += 1
                if pos < n:
                    word += args[pos]
            else:
                word += ch
            pos += 1
        if word == "--":
            rest = args[pos:]
            break
        if blank_ok or word:
            flags.append(word)
        if pos >= n:
            rest = ""
            break
    out: list[tuple[str, str | None]] = []
    for word in flags:
        name, eq, value = word[2:].partition("=")
        out.append((name.lower(), value if eq else None))
    return out, rest


def check_from(text: str, base: str) -> None:
    """Every stage source must be ``base`` or an earlier stage; ContextError naming the line.

    Checked as current and as older engines read the file: either refusing refuses.
    """
    for legacy in (False, True):
        directives, instructions = parse(text, legacy=legacy)
        _check(directives, instructions, base)


def check_triggers(triggers: list[str], base: str) -> None:
    """The base image's own ONBUILD triggers run in this build: they obey the same rule."""
    for trigger in triggers:
        try:
            _check({}, [Instruction(0, "ONBUILD", trigger)], base, first_from=False)
        except ContextError as e:
            raise ContextError(
                f"the base image {base} has an ONBUILD trigger that would pull: {e}"
            ) from None


def _check(
    directives: dict[str, str],
    instructions: list[Instruction],
    base: str,
    *,
    first_from: bool = True,
) -> None:
    if "syntax" in directives:
        raise ContextError(
            f"Dockerfile: the syntax parser directive ({directives['syntax']}) makes the engine "
            "pull a frontend image; remove it (rbd builds never pull)"
        )
    want = normalize_ref(base)
    global_args: dict[str, str] = {}  # plain defaults, for messages only
    stages: list[str] = []  # stage names by index ("" = unnamed)
    for ins in instructions:
        if ins.keyword == "ARG" and not stages:
            global_args.update(_arg_defaults(ins))
        elif ins.keyword == "FROM":
            stages.append(_check_from(ins, want, base, stages, global_args))
        elif not stages and first_from:
            raise ContextError(
                f"{ins.where()}: no FROM line before it; start the Dockerfile with FROM {base}"
            )
        else:
            _check_sources(ins, want, base, stages)
    if not stages and first_from:
        raise ContextError(f"Dockerfile has no FROM line; start it with FROM {base}")


def _check_from(
    ins: Instruction, want: str, base: str, stages: list[str], global_args: dict[str, str]
) -> str:
    flags, rest = builder_flags(ins.args)
    platform = False
    for name, _value in flags:
        if name != "platform":
            raise ContextError(f"{ins.where()}: unknown FROM flag --{name}")
        platform = True
    words = rest.split()
    if not words:
        raise ContextError(f"{ins.where()}: FROM names no image")
    stage = ""
    if len(words) == 3 and words[1].lower() == "as":
        stage = words[2].lower()
    elif len(words) != 1:
        raise ContextError(f"{ins.where()}: use FROM <image> [AS <name>]")
    image = words[0]
    if "$" in image:
        _refuse_variable(ins, image, global_args, base)
    known = {s for s in stages if s}
    if image.lower() in known:
        return stage  # an earlier stage: built here, never pulled (whatever its --platform)
    if normalize_ref(image) != want:
        raise ContextError(
            f"Dockerfile line {ins.line}: FROM {image} is not the base {base} nor an earlier "
            f"stage; rbd builds only on top of an image already distributed to the nodes (use "
            f"--base {image} after distributing it, or change the FROM line)"
        )
    if platform:
        raise ContextError(
            f"{ins.where()}: --platform on the base is refused; rbd builds on the distributed "
            f"base {base} as it is (another platform would make the engine pull it)"
        )
    return stage


def _refuse_variable(ins: Instruction, word: str, args: dict[str, str], base: str) -> None:
    """A FROM naming its image through a variable is refused, saying what it resolves to.

    rbd passes no build args, so a global ARG's default is what Docker would use;
    it is shown, not trusted: a second reader of quotes and escapes could differ.
    """
    names = [m.group(1) or m.group(2) for m in _VARIABLE.finditer(word)]
    known = [f"${n} = {args[n]}" for n in names if args.get(n)]
    shown = f" ({', '.join(known)})" if known else ""
    raise ContextError(
        f"{ins.where()}: FROM {word} uses a variable{shown}; write FROM {base} literally so "
        "every node builds on the distributed base"
    )


def _arg_defaults(ins: Instruction) -> dict[str, str]:
    """The plain ``NAME=default`` pairs of an ARG; a name declared otherwise maps to ""."""
    out: dict[str, str] = {}
    for word in ins.args.split():
        name, eq, default = word.partition("=")
        out[name] = default if eq and _PLAIN_REF.fullmatch(default) else ""
    return out


def _check_sources(ins: Instruction, want: str, base: str, stages: list[str]) -> None:
    """COPY/ADD --from, RUN --mount from=, and ONBUILD's instruction."""
    if ins.keyword == "ONBUILD":
        words = _COMMAND_SPACE.split(ins.args.strip(GO_SPACE), maxsplit=1)
        inner = Instruction(ins.line, words[0].upper(), words[1] if len(words) == 2 else "")
        if inner.keyword in ("FROM", "ONBUILD"):
            raise ContextError(f"{ins.where()}: ONBUILD {inner.keyword} is not allowed")
        _check_sources(inner, want, base, [])  # triggers run in a later build: base only
        return
    if ins.keyword not in ("COPY", "ADD", "RUN"):
        return
    flags, _rest = builder_flags(ins.args)
    for name, value in flags:
        if ins.keyword in ("COPY", "ADD") and name == "from":
            _check_source(ins, value, want, base, stages)
        elif ins.keyword == "RUN" and name == "mount":
            if value is None:
                raise ContextError(f"{ins.where()}: --mount needs a value")
            if any(q in value for q in "\"'"):
                raise ContextError(
                    f"{ins.where()}: quotes in --mount are not accepted by rbd build; write "
                    "its fields plainly (from=<earlier stage>)"
                )
            for field in value.split(","):
                key, eq, source = field.partition("=")
                if key.strip(GO_SPACE).lower() == "from":
                    _check_source(ins, source if eq else None, want, base, stages)


def _check_source(
    ins: Instruction, source: str | None, want: str, base: str, stages: list[str]
) -> None:
    if not source:
        raise ContextError(f"{ins.where()}: from= needs a value (an earlier stage or {base})")
    if "$" in source:
        raise ContextError(
            f"{ins.where()}: {source} uses a variable; name an earlier stage or {base} literally"
        )
    if _INDEX.fullmatch(source):
        if int(source) < len(stages):
            return
        raise ContextError(
            f"{ins.where()}: stage index {source} is not an earlier stage"
            + (f" (stages so far: 0..{len(stages) - 1})" if stages else " (no stage before it)")
        )
    if source.lower() in {s for s in stages if s} or normalize_ref(source) == want:
        return
    named = ", ".join(s for s in stages if s) or "none named"
    raise ContextError(
        f"{ins.where()}: {source} is not the base {base} nor an earlier stage ({named}); "
        "rbd builds never pull, so copy only from the base or an earlier stage"
    )
