"""Every command the README shows is run here, so the README cannot drift from the CLI.

`make demo` and `make test` are checked with `make -n` (running them here would recurse); every `qlora-kit` line runs
for real, in order, on a tiny model, with the README's placeholders pointed at local files and, where a line needs
the hub (an lm-eval task), at the repository's own local task.
"""

from __future__ import annotations

import re
import shlex
import subprocess

from .conftest import REPO, tiny_recipe

LOCAL_TASKS = REPO / "tests" / "lm_eval_tasks"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def localise(command: str) -> list[str]:
    """The README's command as argv, with hub-only parts replaced by their offline equivalents."""
    argv = shlex.split(command)
    if any(arg.startswith("eval.lm_eval.tasks=") for arg in argv):
        argv = [
            arg if not arg.startswith("eval.lm_eval.tasks=") else "eval.lm_eval.tasks=[qlora_kit_demo_sums_mc]"
            for arg in argv
        ]
        argv += [f"eval.lm_eval.include_path={LOCAL_TASKS}", "eval.lm_eval.include_defaults=false"]
    return argv


def run_part(command: str, folder) -> int:
    """One README command in this process: qlora-kit's CLI, or the llama.cpp chat module that `make demo` names.

    The demo's command runs on runs/first (trained above from the README's own recipe) copied to runs/demo, since
    training the real demo here would take minutes.
    """
    import shutil

    from qlora_kit.cli import main
    from qlora_kit.export import chat

    argv = localise(command.removeprefix(".venv/bin/"))
    if "runs/demo" in command and not (folder / "runs" / "demo").exists():
        shutil.copytree(folder / "runs" / "first", folder / "runs" / "demo", ignore=shutil.ignore_patterns("gguf*"))
    if argv[:3] == ["python", "-m", "qlora_kit.export.chat"]:
        return chat.main(argv[3:])
    assert argv[0] == "qlora-kit", command
    return main(argv[1:])


def test_make_demo_ends_with_the_readme_export_and_chat_command():
    dry_run = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True).stdout
    demo_lines = [c for c in readme_commands() if "runs/demo/gguf" in c]
    echoes = [line for line in dry_run.splitlines() if line.startswith("echo ")]  # not make's own "Entering" lines
    assert len(demo_lines) == 1 and demo_lines[0] in echoes[-1]


def test_readme_shows_the_two_setup_commands_first():
    commands = readme_commands()
    assert commands[:2] == ["make demo", "make test"]
    for target in ("demo", "test"):
        dry_run = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
        assert dry_run.returncode == 0, dry_run.stderr


def test_every_qlora_kit_command_in_the_readme_runs(tmp_path, tiny_model_dir, arithmetic_rows, monkeypatch, capsys):

    recipe = tiny_recipe(tmp_path, tiny_model_dir, arithmetic_rows)
    (tmp_path / "my_recipe.yaml").write_text(recipe.read_text())
    commands = [c for c in readme_commands() if c.startswith(("qlora-kit ", ".venv/bin/"))]
    assert len(commands) >= 8
    monkeypatch.chdir(tmp_path)  # the README's relative paths (runs/first, merged/first) land in the temp folder
    for command in commands:  # in this process: the CLI's own entry point, without paying the imports per command
        for part in command.split(" && "):
            code = run_part(part, tmp_path)
            assert code == 0, f"README command failed: {part}\n{capsys.readouterr().err[-2000:]}"
    assert (tmp_path / "runs" / "first" / "merged" / "config.json").is_file()
    assert (tmp_path / "merged" / "first" / "config.json").is_file()
