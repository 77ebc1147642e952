"""The oldest releases pyproject.toml admits: each `name>=X` of the project's dependencies and of
its hiredis extra. Prints them as pip pins (`name==X`); with `--check`, fails unless exactly those
are what this Python has installed."""

import re
import sys
import tomllib
from importlib import metadata

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
floors = {}
for requirement in project["dependencies"] + project["optional-dependencies"]["hiredis"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
    if match is None:
        raise SystemExit(f"no floor to pin in {requirement!r}")
    floors[match[1]] = match[2]


def release(version: str) -> str:
    """The version without trailing zero parts: 4.7.0 and 4.7 are the same release."""
    return re.sub(r"(\.0)+$", "", version)


if sys.argv[1:] == ["--check"]:
    installed = {name: metadata.version(name) for name in floors}
    wrong = {n: v for n, v in installed.items() if release(v) != release(floors[n])}
    if wrong:
        raise SystemExit(f"not the floors: {wrong} (floors {floors})")
    print("floors installed:", ", ".join(f"{n} {v}" for n, v in installed.items()))
else:
    print(" ".join(f"{name}=={version}" for name, version in floors.items()))
