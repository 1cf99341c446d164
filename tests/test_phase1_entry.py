"""Phase 1 entry points: training writes best/last/metrics, resume, the Modal module, flag parity."""

import json

import pytest

import rsd_entry
from common.tokenizer.model import load_tokenizer
from common.tokenizer.train import TokenizerTrainConfig

TINY = ["--num-episodes", "6", "--epochs", "1", "--batch-size", "128", "--no-progress"]


def test_one_epoch_cli_run_writes_best_last_and_metrics(models_dir):
    from phase1_improved.train_rfsq_robust import cli

    result = cli(TINY)
    best = models_dir / "rfsq_robust_best.pt"
    assert result["best_checkpoint"] == str(best)
    assert (models_dir / "rfsq_robust_last.pt").exists()
    lines = (models_dir / "rfsq_robust_metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1
    tok = load_tokenizer(best, require_conditioning="layernorm")
    assert tok.metrics["val_mse"] == pytest.approx(result["best_val_mse"])
    assert tok.extra["train_config"]["num_episodes"] == 6
    assert tok.extra["provenance"]["git_sha"]


def test_naive_flag_writes_the_seed_name_and_resume_continues(models_dir):
    from phase1_improved.train_rfsq_robust import cli

    cli(TINY + ["--no-use-layernorm"])
    assert (models_dir / "rfsq_best.pt").exists()
    cli(["--num-episodes", "6", "--epochs", "2", "--batch-size", "128", "--no-progress", "--no-use-layernorm", "--resume"])
    epochs = [json.loads(l)["epoch"] for l in (models_dir / "rfsq_metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]  # resumed at epoch 2, did not restart
    with pytest.raises(Exception, match="different configuration"):
        cli(["--num-episodes", "7", "--epochs", "3", "--batch-size", "128", "--no-progress", "--no-use-layernorm", "--resume"])


def test_config_validation_messages():
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        TokenizerTrainConfig(epochs=0)
    with pytest.raises(ValueError, match="--conditioning must be one of"):
        TokenizerTrainConfig(conditioning="bn")
    with pytest.raises(SystemExit):
        rsd_entry.parse_config(TokenizerTrainConfig, ["--batch-size", "0"])


def test_modal_module_imports_without_token_and_flags_match_cli(monkeypatch):
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    from modal.cli.run import _get_click_command_for_local_entrypoint

    import phase1_improved.train_rfsq_robust as mod

    parser_flags = {a.option_strings[0] for a in rsd_entry.build_parser(TokenizerTrainConfig)._actions if a.option_strings and a.dest != "help"}
    click_cmd = _get_click_command_for_local_entrypoint(mod.app, mod.main)
    modal_flags = {opt for p in click_cmd.params for opt in p.opts}
    assert parser_flags == modal_flags == set(rsd_entry.cli_flags(TokenizerTrainConfig))
    # bools are --flag/--no-flag on both sides
    modal_secondary = {opt for p in click_cmd.params for opt in p.secondary_opts}
    assert "--no-use-layernorm" in modal_secondary
    assert "--no-use-layernorm" in rsd_entry.build_parser(TokenizerTrainConfig).format_help()


@pytest.mark.filterwarnings("ignore:The train_remote function is executing locally")
def test_modal_function_body_runs_locally(models_dir):
    from phase1_improved.train_rfsq_robust import train_remote

    cfg = TokenizerTrainConfig(num_episodes=4, epochs=1, batch_size=128, progress=False, use_layernorm=False)
    out = train_remote.local(dict(cfg.__dict__))
    assert (models_dir / "rfsq_best.pt").exists() and out["best_val_mse"] > 0
