"""``paci-megatron`` command: hook installation and the explicit Megatron-LM patch.

Usage::

    paci-megatron install-hook            # (re)write paci_megatron.pth into site-packages
    paci-megatron patch PATH              # edit a Megatron-LM checkout (2 lines, see below)
    paci-megatron patch PATH --diff       # only print the change as a unified diff
    paci-megatron patch PATH --revert     # remove it again (with --diff: only print)
    paci-megatron status [PATH]           # what is active: hook file, patched checkout

``pip install paci-megatron`` already installs the hook file; ``install-hook`` is for
editable installs (``pip install -e``), which do not place it. ``patch`` is the visible
alternative to the hook: it inserts, near the top of the checkout's
``megatron/training/__init__.py``, two lines marked ``# paci-megatron`` that activate
the glue whenever Megatron-LM's training package is imported; ``--pipeline-schedule``
then always exists and defaults to ``1f1b`` (Megatron's own schedule, unchanged).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import sysconfig
from typing import List, Optional

__all__ = ["main", "patch_checkout", "revert_checkout", "patched_text", "install_hook"]

MARK = "# paci-megatron"
TARGET = os.path.join("megatron", "training", "__init__.py")
PATCH_LINES = [
    f"import paci_megatron.hook  {MARK}: --pipeline-schedule {{1f1b,paci}}\n",
    f"paci_megatron.hook.activate(glue=True)  {MARK}\n",
]


def _target(path: str) -> str:
    target = os.path.join(path, TARGET)
    if not os.path.isfile(target):
        raise FileNotFoundError(
            f"{path} is not a Megatron-LM checkout: {TARGET} not found (give the folder "
            "that contains pretrain_gpt.py)")
    return target


def _insert_at(lines: List[str]) -> int:
    """Index after the module docstring and comments at the top (before any import)."""
    i = 0
    while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
        i += 1
    if i < len(lines) and lines[i].lstrip()[:3] in ('"""', "'''"):
        quote = lines[i].lstrip()[:3]
        if lines[i].count(quote) >= 2 and lines[i].strip() != quote:
            return i + 1
        i += 1
        while i < len(lines) and quote not in lines[i]:
            i += 1
        return i + 1
    return i


def patched_text(original: str) -> str:
    """``megatron/training/__init__.py`` with the two activation lines inserted."""
    lines = original.splitlines(keepends=True)
    if any(MARK in line for line in lines):
        return original
    at = _insert_at(lines)
    return "".join(lines[:at] + PATCH_LINES + lines[at:])


def unpatched_text(text: str) -> str:
    """``text`` without the lines :func:`patched_text` inserted."""
    return "".join(line for line in text.splitlines(keepends=True) if MARK not in line)


def patch_checkout(path: str, diff_only: bool = False) -> str:
    """Apply the activation edit to the checkout at ``path``; returns the unified diff.

    Idempotent (a patched checkout is left as is and the diff is empty).

    Raises:
        FileNotFoundError: ``path`` holds no ``megatron/training/__init__.py``.
    """
    return _edit(path, patched_text, diff_only)


def revert_checkout(path: str, diff_only: bool = False) -> str:
    """Remove the activation edit; returns the unified diff of the removal ("" if the
    checkout was not patched). With ``diff_only`` nothing is written."""
    return _edit(path, unpatched_text, diff_only)


def _read(target: str) -> str:
    """The target file's text.

    Raises:
        ValueError: it is not UTF-8 text (naming it).
    """
    try:
        with open(target, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{target} is not UTF-8 text ({err.reason} at byte {err.start}): "
                         "is this a Megatron-LM checkout?") from None


def _edit(path: str, change, diff_only: bool) -> str:
    """Apply ``change`` (text -> text) to the checkout's target file; returns the diff."""
    target = _target(path)
    before = _read(target)
    after = change(before)
    diff = "".join(difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True),
        fromfile=f"a/{TARGET}", tofile=f"b/{TARGET}", n=0))
    if not diff_only and after != before:
        with open(target, "w", encoding="utf-8") as f:
            f.write(after)
    return diff


def install_hook(site_packages: Optional[str] = None) -> str:
    """Copy ``paci_megatron.pth`` into ``site_packages`` (default: this interpreter's
    purelib folder); returns the path written.

    Raises:
        NotADirectoryError: ``site_packages`` is not a folder. OSError: it is not writable.
    """
    folder = site_packages or sysconfig.get_paths()["purelib"]
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{folder} is not a folder: give the site-packages folder "
                                 "(python -c 'import sysconfig; print(sysconfig.get_paths()"
                                 "[\"purelib\"])' prints this interpreter's)")
    dest = os.path.join(folder, "paci_megatron.pth")
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paci_megatron.pth")
    with open(source, encoding="utf-8") as src, open(dest, "w", encoding="utf-8") as out:
        out.write(src.read())
    return dest


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``paci-megatron`` command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="paci-megatron", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_hook = sub.add_parser("install-hook", help="write paci_megatron.pth into site-packages")
    p_hook.add_argument("--site-packages", default=None,
                        help="folder to write to (default: this interpreter's site-packages)")
    p_patch = sub.add_parser("patch", help="activate the glue in a Megatron-LM checkout")
    p_patch.add_argument("path", help="Megatron-LM checkout (the folder with pretrain_gpt.py)")
    p_patch.add_argument("--diff", action="store_true", help="print the change, do not write")
    p_patch.add_argument("--revert", action="store_true", help="remove the change")
    p_status = sub.add_parser("status", help="show the hook file and a checkout's state")
    p_status.add_argument("path", nargs="?", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "install-hook":
            print(f"wrote {install_hook(args.site_packages)}")
        elif args.command == "patch" and args.revert:
            diff = revert_checkout(args.path, diff_only=args.diff)
            where = os.path.join(args.path, TARGET)
            if args.diff:
                print(diff or f"not patched: {where}", end="" if diff else "\n")
            else:
                print(f"{'reverted' if diff else 'not patched'}: {where}")
        elif args.command == "patch":
            diff = patch_checkout(args.path, diff_only=args.diff)
            print(diff or f"already patched: {os.path.join(args.path, TARGET)}", end="" if diff else "\n")
        else:
            hook = os.path.join(sysconfig.get_paths()["purelib"], "paci_megatron.pth")
            print(f"hook file: {hook} ({'present' if os.path.exists(hook) else 'missing: run paci-megatron install-hook'})")
            if args.path:
                state = "patched" if MARK in _read(_target(args.path)) else "not patched"
                print(f"checkout: {args.path} ({state})")
    except (OSError, ValueError) as err:  # missing, not a folder, not writable, not UTF-8
        print(f"paci-megatron: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
