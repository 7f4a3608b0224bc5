"""The one grammar of %smolvm lines, as the kernel, the magic and %%smolvm read them."""

from __future__ import annotations

import pytest

from smolvm_kernel.errors import SmolVMError
from smolvm_kernel.jupyter import hostline
from smolvm_kernel.jupyter.hostline import CELL, KERNEL, MAGIC, HostLine, parse


@pytest.mark.parametrize("line, expected", [
    ("", HostLine("help")),
    ("status", HostLine("status")),
    ("config", HostLine("config")),
    ("config --mem 1024 --cpus 1", HostLine("config", settings={"mem_mib": 1024, "vcpus": 1})),
    ("config --timeout 2.5 --network none --disk 4096",
     HostLine("config", settings={"exec_timeout": 2.5, "network": "none", "disk_mib": 4096})),
    ("push data.csv", HostLine("push", ("data.csv",))),
    ("push 'my data.csv' in/", HostLine("push", ("my data.csv", "in/"))),
    ("pull out.png --force", HostLine("pull", ("out.png",), force=True)),
    ("pull ~/x.txt y.txt", HostLine("pull", ("~/x.txt", "y.txt"))),
])
def test_the_kernel_and_the_magic_read_a_line_alike(line, expected):
    assert parse(line, KERNEL) == expected
    assert parse(line + " --name a", MAGIC) == HostLine(expected.command, expected.paths, expected.force,
                                                        "a", expected.settings)


@pytest.mark.parametrize("line, where, words", [
    ("frobnicate", KERNEL, "unknown %smolvm command 'frobnicate'"),
    ("list", KERNEL, "unknown %smolvm command 'list'"),          # the magic's, not the kernel's
    ("start", MAGIC, "unknown %smolvm command 'start'"),
    ("config --bogus 1", KERNEL, "--bogus"),
    ("config --mem lots", KERNEL, "invalid int value: 'lots'"),
    ("push", KERNEL, "usage: %smolvm push LOCAL [REMOTE]"),
    ("push a b c", MAGIC, "usage: %smolvm push LOCAL [REMOTE] [--name N]"),
    ("push a --force", KERNEL, "--force is for pull only"),
    ("status now", KERNEL, "%smolvm status takes no 'now'"),
    ("status --mem 512", KERNEL, "go with %smolvm config"),
    ("config --profile scipy", KERNEL, "the profile is the kernel's"),
    ("push 'unclosed", KERNEL, "cannot parse"),
    ("--name a", KERNEL, "--name"),                             # one VM per kernel: no names
])
def test_a_bad_line_says_what_is_wrong_and_how_to_write_it(line, where, words):
    with pytest.raises(SmolVMError, match=None) as info:
        parse(line, where)
    assert words in str(info.value)


def test_the_cell_magic_takes_the_shape_options_only():
    assert parse("--name s --mem 1024 --timeout 5 --profile scipy", CELL) == HostLine(
        "run", name="s", settings={"mem_mib": 1024, "exec_timeout": 5.0, "profile": "scipy"})
    for line in ("status", "--disk 10", "--network nat"):
        with pytest.raises(SmolVMError, match="usage: %%smolvm"):
            parse(line, CELL)


def test_help_lists_every_command_of_its_place_and_nothing_else():
    for where in (KERNEL, MAGIC):
        text = hostline.help_text(where)
        for command, (_, _, at) in hostline.COMMANDS.items():
            assert (f"%smolvm {command}" in text) == (where in at), (where, command)
    assert "everything else in a cell runs inside the microVM" in hostline.help_text(KERNEL)
    assert "%%smolvm [--name N]" in hostline.help_text(MAGIC)


def test_config_changes_leave_out_what_is_already_so():
    class Config:
        vcpus, mem_mib, disk_mib, exec_timeout, network = 2, 512, 2048, 0.0, "none"

    line = parse("config --cpus 2 --mem 1024", KERNEL)
    assert hostline.config_changes(line, Config()) == {"mem_mib": 1024}
