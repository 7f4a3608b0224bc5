"""A course image's recipe: read from a folder the way Binder reads one, and named by hash.

``smolvm-kernel image build --profile ds101 --from FOLDER`` reads the
repo2docker files it supports (``requirements.txt``, ``apt.txt``,
``runtime.txt``; from ``FOLDER/binder/`` or ``FOLDER/.binder/`` when one
exists, as repo2docker does) and refuses the rest with the reason. The
recipe is stored in the image cache (``<cache>/courses/NAME.json``), so the
image can be found, checked for staleness and rebuilt without the folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from smolvm_kernel.errors import ConfigError
from smolvm_kernel.images import recipe

#: Bump when the course layer's build steps change in a way the inputs do not capture.
LAYER_VERSION = 1
#: Where the pip layer goes in the guest (before Debian's dist-packages on sys.path).
SITE = "usr/local/lib/python3.11/dist-packages"
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
#: Debian Policy 5.6.1: lower case letters, digits, + - . ; at least two, starting alphanumeric.
DEBIAN_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
#: The guest's Python: Debian bookworm's.
RUNTIMES = ("python-3.11",)

#: repo2docker files this builder will not use, and why (what to do instead).
REFUSED = {
    "environment.yml": "conda environments are not supported (the guest has no conda); list the pip "
                       "packages in requirements.txt and Debian packages in apt.txt",
    "environment.yaml": "conda environments are not supported (the guest has no conda); list the pip "
                        "packages in requirements.txt and Debian packages in apt.txt",
    "postBuild": "it would run the course's shell code as root on the build host; put what it installs "
                 "in requirements.txt or apt.txt",
    "start": "it would run the course's shell code at every start; SmolVM starts only the kernel",
    "Dockerfile": "SmolVM images are built from Debian packages and wheels, not Docker; use "
                  "requirements.txt and apt.txt",
    "install.R": "R is not supported (the guest runs the Python kernel only)",
    "DESCRIPTION": "R packages are not supported (the guest runs the Python kernel only)",
    "Project.toml": "Julia is not supported (the guest runs the Python kernel only)",
    "Pipfile": "Pipfile is not read; list the packages in requirements.txt",
    "Pipfile.lock": "Pipfile.lock is not read; list the packages in requirements.txt",
    "default.nix": "Nix is not supported; use requirements.txt and apt.txt",
}
#: At the folder's top (no binder/ folder): repo2docker would `pip install .` the folder.
REFUSED_TOP = {
    "setup.py": "repo2docker would `pip install .` this folder, which runs its setup.py on the build "
                "host; put the packages it needs in requirements.txt (and keep the course's own modules "
                "beside the notebooks)",
    "pyproject.toml": "repo2docker would `pip install .` this folder, which runs its build backend on the "
                      "build host; put the packages it needs in requirements.txt (and keep the course's own "
                      "modules beside the notebooks)",
}


class CourseFolderError(ConfigError):
    """A course folder cannot be built; the message says which file and what to do."""

    def __init__(self, folder: Path, what: str) -> None:
        self.folder = folder
        super().__init__("", None, f"course folder {folder}: {what}")


@dataclasses.dataclass(frozen=True)
class Course:
    """A course image's inputs: what it adds to its base profile."""

    name: str
    base: str
    requirements: str = ""
    apt: tuple[str, ...] = ()
    runtime: str = ""
    folder: str = ""
    files: tuple[str, ...] = ()

    @property
    def rootfs_profile(self) -> recipe.Profile:
        """The Debian part: the base profile's packages plus apt.txt's."""
        base = recipe.PROFILES[self.base]
        if not self.apt:
            return base
        extra = tuple(p for p in self.apt if p not in base.apt)
        return recipe.Profile(f"{self.base}+apt", base.apt + extra, f"{base.description} + apt.txt")

    def to_json(self) -> dict:
        return {"name": self.name, "base": self.base, "requirements": self.requirements,
                "apt": list(self.apt), "runtime": self.runtime, "folder": self.folder,
                "files": list(self.files), "layer": LAYER_VERSION}

    @classmethod
    def from_json(cls, data: dict) -> Course:
        return cls(data["name"], data["base"], data.get("requirements", ""), tuple(data.get("apt", ())),
                   data.get("runtime", ""), data.get("folder", ""), tuple(data.get("files", ())))


def check_name(name: str) -> str:
    if name in recipe.PROFILES:
        raise ConfigError("profile", name, f"{name!r} is a built-in profile; give the course image a new "
                          f"name, e.g. --profile ds101")
    if not NAME_RE.match(name):
        raise ConfigError("profile", name, "a course image's name is 1 to 32 lower-case letters, digits and "
                          "'-', starting with a letter, e.g. ds101")
    return name


def course_key(course: Course, kernel_package: str) -> str:
    """Hash of everything a course image is built from (base image inputs included)."""
    return recipe._digest({
        "image": recipe.image_key(course.rootfs_profile, kernel_package), "base": course.base,
        "requirements": course.requirements, "runtime": course.runtime, "layer": LAYER_VERSION,
        "platforms": PIP_PLATFORMS,
    })


#: The guest is bookworm (glibc 2.36): wheels for any manylinux up to 2.36 run there.
#: (pip expands manylinux2014 to 2010 and 1 itself, but not the PEP 600 names.)
PIP_PLATFORMS = ("manylinux2014_x86_64",) + tuple(f"manylinux_2_{m}_x86_64" for m in range(36, 16, -1))


def read_folder(folder: Path, name: str, base: str = "base") -> Course:
    """The course recipe in ``folder``, or :class:`CourseFolderError` saying why not."""
    check_name(name)
    if base not in recipe.PROFILES:
        raise ConfigError("base", base, f"the base of a course image is one of {', '.join(recipe.PROFILES)}")
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise CourseFolderError(folder, "not a folder")
    conf = folder
    for sub in ("binder", ".binder"):
        if (folder / sub).is_dir():
            conf = folder / sub
            break
    for fname, why in REFUSED.items():
        if (conf / fname).exists():
            raise CourseFolderError(folder, f"{(conf / fname).relative_to(folder)} is not supported: {why}")
    if conf == folder:
        for fname, why in REFUSED_TOP.items():
            if (folder / fname).exists():
                raise CourseFolderError(folder, f"{fname} at the folder's top: {why}")
    files = []
    requirements, wanted = "", 0
    if (conf / "requirements.txt").is_file():
        requirements = (conf / "requirements.txt").read_text()
        wanted = check_requirements(requirements, folder)
        files.append(str((conf / "requirements.txt").relative_to(folder)))
    apt: tuple[str, ...] = ()
    if (conf / "apt.txt").is_file():
        apt = parse_apt((conf / "apt.txt").read_text(), folder)
        files.append(str((conf / "apt.txt").relative_to(folder)))
    runtime = ""
    if (conf / "runtime.txt").is_file():
        runtime = (conf / "runtime.txt").read_text().strip()
        if runtime not in RUNTIMES:
            raise CourseFolderError(folder, f"runtime.txt asks for {runtime!r}, but the guest's Python is "
                                    f"Debian bookworm's 3.11: write python-3.11 or remove runtime.txt")
        files.append(str((conf / "runtime.txt").relative_to(folder)))
    if not wanted and not apt:
        raise CourseFolderError(folder, "neither requirements.txt nor apt.txt lists a package; write the pip "
                                "packages the course needs into requirements.txt (one a line)")
    return Course(name, base, requirements, apt, runtime, str(folder), tuple(files))


def parse_apt(text: str, folder: Path | str = "apt.txt") -> tuple[str, ...]:
    """Debian package names, one a line; '#' starts a comment."""
    names = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        for word in line.split():
            if not DEBIAN_NAME_RE.match(word):
                raise CourseFolderError(Path(folder), f"apt.txt line {n}: {word!r} is not a Debian package name "
                                        f"(lower-case letters, digits, '+', '-', '.'; no versions or options)")
            if word not in names:
                names.append(word)
    return tuple(names)


def check_requirements(text: str, folder: Path | str = "requirements.txt") -> int:
    """Refuse what would fetch from elsewhere than PyPI or build from source on the host;
    return how many requirements there are."""
    from packaging.requirements import InvalidRequirement, Requirement

    count = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise CourseFolderError(Path(folder), f"requirements.txt line {n}: {line!r}: pip options (-e, -r, "
                                    f"--index-url, ...) are not supported; list package names with versions")
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise CourseFolderError(Path(folder), f"requirements.txt line {n}: {line!r} is not a requirement "
                                    f"pip reads from PyPI ({exc}); write e.g. tabulate==0.9.0") from None
        if req.url:
            raise CourseFolderError(Path(folder), f"requirements.txt line {n}: {line!r} installs from a URL or "
                                    f"path; only packages from PyPI are supported")
        count += 1
    return count


# ------------------------------------------------------------------ the registry

def courses_dir(cache_root: Path) -> Path:
    return cache_root / "courses"


def load(cache_root: Path, name: str) -> Course | None:
    try:
        return Course.from_json(json.loads((courses_dir(cache_root) / f"{name}.json").read_text()))
    except (OSError, ValueError, KeyError):
        return None


def registered(cache_root: Path) -> dict[str, Course]:
    """Every course recipe in this cache, by name."""
    out = {}
    folder = courses_dir(cache_root)
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            course = load(cache_root, path.stem)
            if course is not None and course.name == path.stem:
                out[course.name] = course
    return out


def register(cache_root: Path, course: Course) -> Path:
    folder = courses_dir(cache_root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{course.name}.json"
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(course.to_json(), indent=2))
    os.replace(tmp, path)
    return path
