"""`rbd build` keeps its rule: the Dockerfile is read as Docker reads it; nothing is pulled.

Pure parser tests (rainbowd/dockerfile.py through dockerfile.check_from, the
function the CLI, the coordinator and the agent all call), including the two
Dockerfiles from issue 14 that the old line-based check let through, and one
real build on the session's private dockerd with the agent's own parameters
(classic builder, pull=0): a Dockerfile using every accepted form builds with
no registry at all.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import aiodocker
import pytest

from rainbowd.devcluster.dockerd import PrivateDockerd
from rainbowd.lib.buildcontext import ContextError
from rainbowd.lib.dockerfile import MAX_DOCKERFILE, builder_flags, check_from, check_triggers, parse

BASE = "rbd-demo:latest"


def refused(text: str, *needles: str) -> str:
    with pytest.raises(ContextError) as e:
        check_from(text, BASE)
    message = str(e.value)
    for needle in needles:
        assert needle in message, message
    return message


# -- the two examples of issue 14 --------------------------------------------
def test_escape_directive_cannot_hide_a_second_from() -> None:
    # with escape=` a trailing \ continues nothing: Docker sees two FROMs
    text = f"# escape=`\nFROM {BASE}\nRUN echo hi \\\nFROM alpine\nRUN true\n"
    refused(text, "line 4", "FROM alpine is not the base rbd-demo:latest")
    # and the backtick is the continuation character
    check_from(f"# escape=`\nFROM {BASE} `\n  AS build\nCOPY --from=build / /\n", BASE)


def test_copy_from_another_image_is_refused() -> None:
    refused(
        f"FROM {BASE}\nRUN true\nCOPY --from=alpine /bin/sh /sh\n",
        "line 3",
        "alpine is not the base rbd-demo:latest nor an earlier stage",
    )


# -- directives --------------------------------------------------------------
def test_directives_only_at_the_top() -> None:
    # after a comment, "# escape=`" is a comment: \ continues, one FROM
    check_from(f"# hello\n# escape=`\nFROM {BASE} \\\n  AS b\n", BASE)
    # after a blank line too
    check_from(f"\n# escape=`\nFROM {BASE} \\\n  AS b\n", BASE)
    # leading blanks and spaces around = are allowed, as in Docker
    refused(f"  #  ESCAPE = `\nFROM {BASE}\nRUN \\\nFROM alpine\n", "line 4", "FROM alpine")


def test_repeated_or_bad_directives_are_errors() -> None:
    refused("# escape=`\n# escape=`\nFROM x\n", "only one escape parser directive")
    refused("# escape=x\nFROM x\n", "escape parser directive 'x' is invalid")


def test_syntax_directive_is_refused_it_pulls_a_frontend() -> None:
    refused(f"# syntax=docker/dockerfile:1\nFROM {BASE}\n", "syntax parser directive", "pull")


def test_check_directive_read_both_ways() -> None:
    # new engines: check is a directive, so escape=` applies and there are two FROMs;
    # older ones stop at check and join the lines: refused either way
    refused(f"# check=skip=all\n# escape=`\nFROM {BASE} \\\nFROM alpine\n")


# -- continuations and comments -----------------------------------------------
def test_continuations_comments_and_blank_lines_inside() -> None:
    text = f"FROM {BASE}\nRUN echo \\\n# FROM alpine\n\n  hi\nCOPY --from=0 / /x\n"
    _directives, ins = parse(text)
    assert [(i.line, i.keyword) for i in ins] == [(1, "FROM"), (2, "RUN"), (6, "COPY")]
    assert ins[1].args == "echo   hi"
    check_from(text, BASE)


def test_an_escaped_escape_at_the_end_is_read_both_ways() -> None:
    # current Docker: "\\" at the end continues nothing, so FROM alpine is an instruction
    refused(f"FROM {BASE}\nRUN echo \\\\\nFROM alpine\n", "line 3", "FROM alpine")


def test_whitespace_is_gos_not_pythons() -> None:
    # \x1c is whitespace to Python but not to Go: Docker reads line 3 as part of RUN's
    # continuation ending there, and FROM alpine as an instruction
    refused(f"FROM {BASE}\nRUN echo \\\n\x1c# hi\nFROM alpine\n", "FROM alpine")


def test_crlf_and_bom() -> None:
    refused(f"\ufeffFROM {BASE}\r\nCOPY --from=alpine a b\r\n", "line 2", "alpine")
    check_from(f"\ufeffFROM {BASE}\r\nRUN true \\\r\n  && true\r\n", BASE)


# -- FROM ----------------------------------------------------------------------
def test_every_from_and_stage_names() -> None:
    check_from(f"FROM {BASE} AS Build\nRUN make\nFROM build\nFROM BUILD AS two\nFROM two\n", BASE)
    check_from("FROM rbd-demo\n", BASE)  # name == name:latest
    refused(f"FROM {BASE}\nFROM later\nFROM {BASE} AS later\n", "line 2", "FROM later")
    refused(f"FROM {BASE} extra words\n", "use FROM <image> [AS <name>]")
    refused("FROM\n", "names no image")
    refused(f"FROM {BASE}@sha256:{'0' * 64}\n", "is not the base")
    refused("FROM scratch\n", "FROM scratch is not the base")


def test_platform_on_the_base_is_refused_on_a_stage_allowed() -> None:
    refused(f"FROM --platform=linux/arm64 {BASE}\n", "--platform", "pull")
    check_from(f"FROM {BASE} AS b\nFROM --platform=linux/amd64 b\n", BASE)
    refused(f"FROM --pull=always {BASE}\n", "unknown FROM flag --pull")


def test_arg_substituted_from_is_refused_and_resolved_in_the_message() -> None:
    msg = refused("ARG B=alpine\nFROM ${B}\n", "line 2", "uses a variable", "$B = alpine")
    assert f"write FROM {BASE} literally" in msg
    refused(f"ARG B={BASE}\nFROM $B\n", "uses a variable")
    refused('ARG B="alpine"\nFROM $B\n', "uses a variable")
    refused("RUN true\n", "no FROM line before it")


# -- COPY --from, ADD --from, RUN --mount, ONBUILD -------------------------------
def test_copy_from_stages_by_name_and_index() -> None:
    ok = (
        f"FROM {BASE} AS build\nRUN make\nFROM {BASE}\n"
        "COPY --from=build /out /out\nCOPY --from=BUILD /out /o2\nCOPY --from=0 /x /x\n"
        f"COPY --chown=1:1 --from={BASE} /etc/passwd /p\nCOPY --link --from=rbd-demo / /\n"
    )
    check_from(ok, BASE)
    refused(f"FROM {BASE}\nCOPY --from=1 / /\n", "stage index 1 is not an earlier stage")
    refused(f"FROM {BASE}\nCOPY --from=+0 / /\n", "+0 is not the base")
    refused(f"FROM {BASE}\nCOPY --from=later / /\nFROM {BASE} AS later\n", "line 2")
    refused(f"FROM {BASE}\nCOPY --from=$S / /\n", "uses a variable")
    refused(f"FROM {BASE}\nCOPY --from= / /\n", "needs a value")
    refused(f"FROM {BASE}\nCOPY --from / /\n", "needs a value")
    # Docker unquotes and unescapes flag values: so does the check
    refused(f'FROM {BASE}\nCOPY --from="alpine" / /\n', "alpine is not the base")
    refused(f"FROM {BASE}\nCOPY --from=alp\\ine / /\n", "alpine is not the base")
    refused(f"FROM {BASE}\nADD --from=alpine / /\n", "alpine")
    refused(f"FROM {BASE}\n  copy   --FROM=alpine / /\n", "alpine")


def test_run_mount_from() -> None:
    check_from(f"FROM {BASE} AS b\nRUN --mount=type=bind,from=b,target=/b true\n", BASE)
    check_from(f"FROM {BASE}\nRUN --mount=type=cache,target=/c --network=none true\n", BASE)
    refused(f"FROM {BASE}\nRUN --mount=type=bind,from=alpine,target=/a true\n", "alpine")
    refused(f"FROM {BASE}\nRUN --mount=target=/a,FROM=alpine true\n", "alpine")
    refused(f'FROM {BASE}\nRUN --mount="type=bind,from=alpine" true\n', "alpine")
    refused(f"FROM {BASE}\nRUN --mount=type=bind,'from'=x true\n", "x is not the base")
    refused(f'FROM {BASE}\nRUN --mount="type=bind,\\"from\\"=b" true\n', "quotes in --mount")


def test_onbuild_triggers() -> None:
    refused(f"FROM {BASE}\nONBUILD COPY --from=alpine / /\n", "line 2", "alpine")
    refused(f"FROM {BASE}\nONBUILD FROM alpine\n", "ONBUILD FROM is not allowed")
    check_from(f"FROM {BASE}\nONBUILD RUN true\n", BASE)
    check_triggers(["RUN echo hi", f"COPY --from={BASE} / /"], BASE)
    with pytest.raises(ContextError, match="ONBUILD trigger that would pull"):
        check_triggers(["RUN --mount=from=alpine,target=/a true"], BASE)


def test_builder_flags_as_docker_reads_them() -> None:
    assert builder_flags('--a=1 --b="x y" --c --  --d=2 rest') == (
        [("a", "1"), ("b", "x y"), ("c", None)],
        "  --d=2 rest",
    )
    assert builder_flags("src dst") == ([], "src dst")
    assert builder_flags("--from=a\\ b c") == ([("from", "a b")], "c")


def test_size_is_bounded() -> None:
    refused("#" * (MAX_DOCKERFILE + 1), "larger than")


# -- a real build, with the agent's parameters -------------------------------------
def _context(dockerfile: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.docker
async def test_accepted_forms_build_for_real_without_a_registry(
    dockerd: PrivateDockerd, demo_image: Path
) -> None:
    """Every accepted form, built by a real dockerd with pull=0 and the classic builder."""
    ref = "rbd-demo:latest"
    dockerfile = (
        "# escape=`\n"
        "# a comment, then a continuation with the backtick\n"
        f"FROM {ref} `\n"
        "  AS build\n"
        "RUN echo built > /built.txt\n"
        f"FROM {ref}\n"
        "COPY --from=build /built.txt /from-name.txt\n"
        "COPY --from=0 /built.txt /from-index.txt\n"
        f"COPY --from={ref} /bin/busybox /busybox-copy\n"
    )
    check_from(dockerfile, ref)
    tag = "rbd-build-rule:1"
    async with aiodocker.Docker(url=dockerd.url) as docker:
        await docker.images.import_image(data=demo_image.read_bytes())
        params = {"t": tag, "rm": "1", "forcerm": "1", "pull": "0", "version": "1"}
        errors: list[str] = []
        async with docker._query(
            "build",
            "POST",
            params=params,
            headers={"content-type": "application/x-tar"},
            data=_context(dockerfile),
        ) as resp:
            async for raw in resp.content:
                for line in raw.decode().splitlines():
                    item = json.loads(line) if line.strip().startswith("{") else {}
                    if item.get("error"):
                        errors.append(str(item["error"]))
        assert errors == []
        info = await docker.images.inspect(tag)
        assert info["Id"]
        await docker.images.delete(tag, force=True)
