"""A mistyped command line gets one line on stderr that names the argument or file and the fix,
exit code 2 and no traceback, before anything is built or any process group exists.

Each case calls the command's real ``main`` (what ``launch/*.py`` and the console scripts run) in
this process: the message is all it prints.
"""

from __future__ import annotations

import pytest
from training_support import REPO, TINY

from malora_dist.commands import evaluate as evaluate_cli
from malora_dist.commands import train as train_cli
from malora_dist.commands.generate import main as generate_main


def _files(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"format": "malora_dist",\n  "malora_dist": {method: "malora"}}\n')
    (tmp_path / "prompts.txt").write_bytes("Capital of Ermania?\n".encode() + b"caf\xe9 au lait\n")
    return adapter, tmp_path / "prompts.txt"


# id -> (command, arguments with {adapter} and {prompts} filled in, what the line must name)
CASES = {
    "negative world size": (train_cli.main, ["--config", TINY, "--dry-run", "--world-size", "-2"],
                            ["--world-size", "positive", "-2"]),
    "zero world size": (train_cli.main, ["--config", TINY, "--dry-run", "--world-size", "0"],
                        ["--world-size", "positive", "got 0"]),
    "world size without a dry run": (train_cli.main, ["--config", TINY, "--world-size", "2"],
                                     ["--world-size goes with --dry-run"]),
    "config is a directory": (train_cli.main, ["--config", f"{REPO}/configs", "--dry-run"],
                              [f"config file '{REPO}/configs' is a directory", "give the file itself",
                               "configs/demo.yaml"]),
    "malformed adapter config": (evaluate_cli.main, ["--config", TINY, "--adapter", "{adapter}"],
                                 ["adapter config '{adapter}/adapter_config.json' is not valid JSON",
                                  "line 2 column 19"]),
    "prompts not UTF-8": (generate_main, ["--config", TINY, "--prompts", "{prompts}"],
                          ["--prompts '{prompts}' is not UTF-8 text", "byte 0xe9", "save it as UTF-8"]),
    "task with an unknown style": (evaluate_cli.main,
                                   ["--config", TINY, "--task", "foo=synthetic:capitals:nosuchstyle"],
                                   ["--task 'foo=synthetic:capitals:nosuchstyle'", "'nosuchstyle'",
                                    "neither a style (text, label, generation) nor a format"]),
}


@pytest.mark.parametrize("main,args,fragments", CASES.values(), ids=CASES)
def test_bad_invocation_is_one_line_naming_the_argument(main, args, fragments, tmp_path, capsys, monkeypatch):
    adapter, prompts = _files(tmp_path)
    fill = lambda text: text.format(adapter=adapter, prompts=prompts)  # noqa: E731
    monkeypatch.chdir(REPO)
    assert main([fill(a) for a in args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fill(fragment) in lines[0], (fill(fragment), lines[0])
