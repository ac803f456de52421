"""Requirement sets for the image, derived from pyproject.toml's pins (the one source of truth).

Used by the Dockerfile's builder stage, which installs in this order:

1. ``torch.txt``   - the pinned torch, alone, so the Dockerfile chooses its wheel index (the CPU
                     index for the CPU image, PyPI's default CUDA build for the GPU image);
2. ``runtime.txt`` - every other pinned dependency; for ``--variant gpu`` the project's
                     ``faiss-cpu`` pin is swapped for the FAISS GPU requirement given with
                     ``--faiss-gpu`` (both wheels provide the same ``faiss`` module and must never
                     be installed together);
3. the project itself with ``pip install --no-deps`` (its dependencies are all in place).

``--extra NAME --only PKG`` prints one pin of an optional-dependency group (the loadtest stage
takes locust's pin from the ``dev`` extra this way).

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

TORCH = "torch"
FAISS_CPU = "faiss-cpu"


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise SystemExit(f"cannot parse requirement {requirement!r}")
    return canonical(match.group(1))


def load(pyproject: Path, extra: str | None) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    if extra is None:
        return list(project["dependencies"])
    try:
        return list(project["optional-dependencies"][extra])
    except KeyError:
        raise SystemExit(f"{pyproject} has no optional-dependencies group {extra!r}") from None


def pick(requirements: list[str], name: str) -> str:
    found = [r for r in requirements if requirement_name(r) == canonical(name)]
    if len(found) != 1:
        raise SystemExit(f"expected exactly one requirement for {name!r}, found {found}")
    if "==" not in found[0]:
        raise SystemExit(f"{found[0]!r} is not an exact pin")
    return found[0]


def split(requirements: list[str], variant: str, faiss_gpu: str | None) -> tuple[str, list[str]]:
    """(torch pin, the rest with FAISS chosen for the variant)."""
    torch = pick(requirements, TORCH)
    faiss_cpu = pick(requirements, FAISS_CPU)
    rest = [r for r in requirements if requirement_name(r) not in {TORCH, FAISS_CPU}]
    if variant == "cpu":
        rest.append(faiss_cpu)
    else:
        if not faiss_gpu or "==" not in faiss_gpu:
            raise SystemExit("--variant gpu needs --faiss-gpu with an exact pin (NAME==VERSION)")
        rest.append(faiss_gpu)
    return torch, rest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    p.add_argument("--variant", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--faiss-gpu", help="the FAISS GPU requirement, e.g. faiss-gpu==1.15.1")
    p.add_argument("--out", type=Path, help="write torch.txt and runtime.txt into this folder")
    p.add_argument("--extra", help="read this optional-dependencies group instead")
    p.add_argument("--only", help="print the pin of this one package and stop")
    args = p.parse_args(argv)

    requirements = load(args.pyproject, args.extra)
    if args.only:
        print(pick(requirements, args.only))
        return 0
    if args.out is None:
        p.error("--out or --only is required")
    torch, rest = split(requirements, args.variant, args.faiss_gpu)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "torch.txt").write_text(torch + "\n", encoding="utf-8")
    (args.out / "runtime.txt").write_text("\n".join(rest) + "\n", encoding="utf-8")
    print(f"{args.variant}: {torch}; " + ", ".join(rest), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
