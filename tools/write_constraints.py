"""Writes a face's constraints file: every distribution that `megatron-intuitor[<extras>]` pulls
in, at the version installed in this environment (the one the suite passed in).

    python tools/write_constraints.py cpu,dev > constraints/cpu.txt

Walks the installed requirement closure through package metadata (markers evaluated for this
machine); the project itself is left out.
"""
from __future__ import annotations

import argparse
import re
from importlib import metadata

from packaging.requirements import Requirement


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(root: str, extras: list[str]) -> dict[str, str]:
    """{canonical name: installed version} of everything `root[extras]` requires, recursively."""
    pinned: dict[str, str] = {}
    pending = [(root, tuple(extras))]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while pending:
        name, wanted_extras = pending.pop()
        if (name, wanted_extras) in seen:
            continue
        seen.add((name, wanted_extras))
        distribution = metadata.distribution(name)
        for line in distribution.requires or []:
            requirement = Requirement(line)
            environments = [{"extra": extra} for extra in wanted_extras] or [{"extra": ""}]
            if requirement.marker and not any(requirement.marker.evaluate(env)
                                              for env in environments):
                continue
            try:
                version = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                continue  # an optional dependency this environment does not have
            pinned[_canonical(requirement.name)] = version
            pending.append((requirement.name, tuple(sorted(requirement.extras))))
    pinned.pop(_canonical(root), None)
    return pinned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("extras", help="comma-separated extras, e.g. cpu,dev")
    args = parser.parse_args()
    closure = requirement_closure("megatron-intuitor", args.extras.split(","))
    print(f"# megatron-intuitor[{args.extras}]: the versions the suite passed with "
          f"(tools/write_constraints.py {args.extras}).")
    for name, version in sorted(closure.items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
