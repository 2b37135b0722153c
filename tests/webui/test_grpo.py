"""The board's grpo stage: the GRPO panel <-> config (both dialects), reward files kept in the working folder, the
strings, the prompt preview, the live reward curves from a grpo metrics.jsonl, plots/reward.png, and a tiny run
through the handlers."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from tests.conftest import write_json
from tests.webui.conftest import tiny_values, train_handlers
from tuneforge.webui.workspace import PathRefused

PROMPTS = [{"instruction": "Count to three.", "output": "1 2 3", "level": "easy"},
           {"instruction": "Name a colour.", "output": "red", "level": "easy"}]
PANEL = {"num_generations": 4, "grpo_loss": "bnpo", "grpo_beta": 0.04, "grpo_epsilon": 0.1,
         "grpo_epsilon_high": 0.28, "scale_rewards": "none", "num_iterations": 2, "max_completion_length": 16,
         "mask_truncated": True, "reward_funcs": "accuracy\n\n# a comment\nrewards.py:short\n{func: length, max_words: 5}",
         "reward_weights": "1, 0.5, 2"}
# what a 4-step grpo run writes to metrics.jsonl (names from tuneforge.stages.grpo and tuneforge.rewards)
RECORDS = [{"step": s, "loss": 0.01 * s, "lr": 1e-4, "reward": 0.1 * s, "reward_std": 0.2, "frac_reward_zero_std": 0.0,
            "rewards/accuracy/mean": 0.05 * s, "rewards/accuracy/std": 0.1, "rewards/short/mean": 0.5,
            "rewards/short/std": 0.0, "completions/mean_length": 8.0, "clip_ratio/region_mean": 0.0}
           for s in (1, 2, 3, 4)]


@pytest.fixture
def reward_file(workspace):
    path = workspace.root / "rewards.py"
    path.write_text("def short(prompts, completions, completion_ids, **kwargs):\n"
                    "    return [1.0 if len(ids) < 6 else 0.0 for ids in completion_ids]\n", encoding="utf-8")
    write_json(workspace.data_dir / "prompts.json", PROMPTS)
    write_json(workspace.data_dir / "dataset_info.json", {"prompts": {"file_name": "prompts.json"}})
    return path


def grpo_values(ws, **changes) -> dict:
    return tiny_values(ws, stage="grpo", dataset=["prompts"], **{**PANEL, **changes})


# -- form <-> config -----------------------------------------------------------------------------------------

def test_panel_lands_in_the_grpo_section(workspace, reward_file):
    from tuneforge.webui.form import build_config, config_tree

    tree = config_tree(grpo_values(workspace), workspace)
    assert tree["grpo"] == {"num_generations": 4, "loss_type": "bnpo", "beta": 0.04, "epsilon": 0.1,
                            "epsilon_high": 0.28, "scale_rewards": "none", "num_iterations": 2,
                            "max_completion_length": 16, "mask_truncated_completions": True,
                            "reward_funcs": ["accuracy", f"{reward_file}:short", {"func": "length", "max_words": 5}],
                            "reward_weights": [1.0, 0.5, 2.0]}
    assert not {"dpo", "kto"} & set(tree)
    cfg = build_config(grpo_values(workspace), workspace)
    assert (cfg.stage, cfg.grpo.num_generations, cfg.grpo.loss_type, cfg.grpo.beta) == ("grpo", 4, "bnpo", 0.04)
    assert cfg.grpo.reward_weights == [1.0, 0.5, 2.0]
    # an untouched panel writes only the reward function (grpo needs one); other stages never get a grpo section
    plain = config_tree(tiny_values(workspace, stage="grpo", reward_funcs="format"), workspace)
    assert plain["grpo"] == {"reward_funcs": ["format"]}
    for stage in ("sft", "dpo", "kto"):
        assert "grpo" not in config_tree(tiny_values(workspace, stage=stage, **PANEL), workspace), stage
    with pytest.raises(Exception, match="reward function"):
        build_config(tiny_values(workspace, stage="grpo"), workspace)
    with pytest.raises(Exception, match="reward weights"):
        build_config(grpo_values(workspace, reward_weights="1, heavy"), workspace)
    with pytest.raises(Exception, match="reward_weights"):
        build_config(grpo_values(workspace, reward_weights="1, 2"), workspace)  # two weights, three functions


def test_reward_files_stay_in_the_working_folder(workspace, reward_file):
    from tuneforge.webui.form import build_config

    for escape in ({"reward_funcs": "/etc/evil.py:f"}, {"reward_funcs": "../evil.py:f"},
                   {"reward_funcs": "{func: /tmp/evil.py:f, scale: 2}"},
                   {"reward_funcs": "", "extra_args": 'grpo.reward_funcs=["/etc/evil.py:f"]'},
                   {"reward_funcs": "", "extra_args": "reward_funcs=[/etc/evil.py:f]"}):
        with pytest.raises(PathRefused):
            build_config(grpo_values(workspace, reward_weights="", **escape), workspace)
    # built-ins and modules are no files; an absolute path inside the folder is kept
    cfg = build_config(grpo_values(workspace, reward_funcs=f"format\nmy_pkg.rewards:score\n{reward_file}:short",
                                   reward_weights=""), workspace)
    assert cfg.grpo.reward_funcs == ["format", "my_pkg.rewards:score", f"{reward_file}:short"]


def test_grpo_settings_round_trip_through_save_and_load(workspace, reward_file):
    from tuneforge.webui.form import GRPO, build_config, load_args, save_args

    values = grpo_values(workspace, extra_args="grpo.completions_logged=2\ngeneration.temperature=0.9")
    saved = build_config(values, workspace)
    path = save_args(values, workspace, "grpo_args")
    tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert tree["stage"] == "grpo" and tree["grpo"]["reward_funcs"][1] == f"{reward_file}:short"
    loaded = load_args(workspace, path.name)
    for key in GRPO:
        if key == "reward_funcs":  # comments and blank lines go; the file is shown relative to the root
            assert loaded[key] == "accuracy\nrewards.py:short\n{func: length, max_words: 5}"
        elif key == "reward_weights":
            assert loaded[key] == "1, 0.5, 2"
        else:
            assert loaded[key] == values[key], key
    assert sorted(loaded["extra_args"].splitlines()) == ["generation.temperature=0.9", "grpo.completions_logged=2"]
    assert build_config(loaded, workspace) == saved  # Load args then Start trains what was saved
    # another stage's file shows the panel's defaults
    sft = load_args(workspace, save_args(tiny_values(workspace), workspace, "sft_args").name)
    assert (sft["num_generations"], sft["grpo_loss"], sft["reward_funcs"], sft["reward_weights"]) == (8, "dapo", "", "")


def test_load_args_reads_llamafactory_style_grpo_keys(workspace, reward_file):
    from tuneforge.webui.form import build_config, load_args

    (workspace.config_dir / "lf_grpo.yaml").write_text(
        "model_name_or_path: models/tiny\nstage: grpo\nfinetuning_type: lora\ndataset: prompts\ntemplate: chatml\n"
        "num_generations: 4\ngrpo_loss: dr_grpo\npref_beta: 0.02\nscale_rewards: batch\nmax_completion_length: 32\n"
        "reward_funcs: [accuracy, rewards.py:short]\nreward_weights: [2.0, 1.0]\n", encoding="utf-8")
    values = load_args(workspace, "lf_grpo")
    assert (values["stage"], values["num_generations"], values["grpo_loss"], values["grpo_beta"]) == \
        ("grpo", 4, "dr_grpo", 0.02)
    assert (values["scale_rewards"], values["max_completion_length"]) == ("batch", 32)
    # a relative reward file is taken from the working folder (where training runs), as `tuneforge train` does
    assert values["reward_funcs"] == "accuracy\nrewards.py:short" and values["reward_weights"] == "2, 1"
    # pref_beta also set dpo's and kto's beta: the panel's beta stands for them, nothing lands in extra settings
    assert values["extra_args"] == ""
    cfg = build_config(values, workspace)
    assert (cfg.grpo.num_generations, cfg.grpo.loss_type, cfg.grpo.beta) == (4, "dr_grpo", 0.02)
    assert cfg.grpo.reward_funcs == ["accuracy", f"{reward_file}:short"]
    assert cfg.grpo.reward_weights == [2.0, 1.0]


# -- strings and the page ------------------------------------------------------------------------------------

def test_grpo_fields_are_in_the_form_and_translated(board):
    from tuneforge.webui.form import GRPO_KEYS, STAGE_KEYS
    from tuneforge.webui.i18n import STRINGS, text
    from tuneforge.webui.tabs_train import TRAIN_KEYS

    translated = {key for _, key, _ in board.translated}
    for key in [*GRPO_KEYS, "grpo_panel"]:
        assert key in translated and text(key, "en") != text(key, "zh"), key
        assert any("\u4e00" <= ch <= "\u9fff" for ch in STRINGS[key][1]), key
    assert set(GRPO_KEYS) <= set(TRAIN_KEYS) & set(board.fields) & set(STAGE_KEYS)
    assert ("grpo", "grpo") in board.fields["stage"].choices
    assert board.fields["grpo_loss"].choices == [(n, n) for n in ("grpo", "bnpo", "dr_grpo", "dapo")]
    assert board.fields["scale_rewards"].choices == [(n, n) for n in ("group", "batch", "none")]
    assert board.fields["grpo_loss"].value == "dapo" and board.fields["num_generations"].value == 8


def test_preview_of_grpo_prompts_trains_no_token(workspace, reward_file):
    from tuneforge.webui.actions import preview_data

    shown = preview_data(grpo_values(workspace, cutoff_len=128), workspace, 1)
    assert shown.counts["encoded"] == 2 and [r["level"] for r in shown.raw] == ["easy", "easy"]
    assert shown.encoded_html.count('<div class="tf-row">') == 2
    assert "[prompt: " in shown.encoded_html and "<mark" not in shown.encoded_html
    assert "Count to three." in shown.encoded_html


# -- the curves ----------------------------------------------------------------------------------------------

def _job_over(tmp_path, records):
    from tuneforge.webui.runner import TrainJob, wait_for

    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    job = TrainJob([sys.executable, "-c", "pass"], tmp_path, run_dir, run_dir / "train.log")
    return wait_for(job, ("finished", "failed"), 30)


def test_live_plot_shows_the_rewards_of_a_grpo_run(tmp_path):
    from tuneforge.webui.tabs_train import loss_frame

    frame = loss_frame(_job_over(tmp_path, RECORDS).losses)
    curves = {name: list(zip(group["step"], group["value"])) for name, group in frame.groupby("series")}
    steps = (1, 2, 3, 4)
    assert curves == {"loss": [(s, 0.01 * s) for s in steps], "reward": [(s, 0.1 * s) for s in steps],
                      "rewards/accuracy/mean": [(s, 0.05 * s) for s in steps],
                      "rewards/short/mean": [(s, 0.5) for s in steps]}
    # dpo's rewards/* are not reward functions; a reward undefined at a step (null) is no point
    dpo = loss_frame([{"step": 1, "loss": 0.7, "rewards/chosen": 0.1, "rewards/margins": 0.2}])
    assert sorted(set(dpo["series"])) == ["loss", "rewards/margins"]
    gap = loss_frame([{"step": 1, "loss": 0.1, "reward": None}, {"step": 2, "loss": 0.1, "reward": 0.5}])
    assert list(gap[gap["series"] == "reward"]["step"]) == [2]


def test_plots_get_a_reward_plot_for_grpo_only(tmp_path):
    from tuneforge.train.plot import plot_loss, reward_keys

    assert reward_keys(RECORDS) == ["reward", "rewards/accuracy/mean", "rewards/short/mean"]
    plots = tmp_path / "grpo" / "plots"
    assert plot_loss(RECORDS, plots / "loss.png") == plots / "loss.png"
    assert (plots / "reward.png").stat().st_size > 0
    dpo = tmp_path / "dpo" / "plots"
    plot_loss([{"step": 1, "loss": 0.7, "rewards/accuracies": 0.5, "rewards/margins": 0.1}], dpo / "loss.png")
    assert sorted(p.name for p in dpo.iterdir()) == ["loss.png"]


# -- a real run ----------------------------------------------------------------------------------------------

def test_start_poll_and_finish_a_tiny_grpo_run(board, workspace, reward_file):
    from tuneforge.webui.runner import wait_for

    values = grpo_values(workspace, method="full", max_steps=2, batch_size=2, grad_accum=1, cutoff_len=128,
                         num_generations=2, max_completion_length=4, num_iterations=1, grpo_beta=0.0,
                         reward_funcs="rewards.py:short\nlength", reward_weights="", output_dir="runs/grpo")
    handlers = train_handlers(board)
    handlers.start(*[values[k] for k in handlers.keys])
    status = wait_for(board.job, ("finished", "failed"), 240)
    assert status.state == "finished", status.log_tail
    progress, line, log, frame, timer, adapters = handlers.poll()
    assert 'data-state="finished"' in progress and 'data-step="2"' in progress
    for series in ("loss", "reward", "rewards/short/mean", "rewards/length/mean"):
        assert list(frame[frame["series"] == series]["step"]) == [1, 2], series
    run = workspace.runs_dir / "grpo"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["rewards/short/mean"] for r in records if "loss" in r] == [1.0, 1.0]  # 4 tokens < 6: always 1
    assert (run / "plots" / "reward.png").is_file()


# -- ppo's panel (its stage is tested in tests/stages) -------------------------------------------------------

def test_ppo_panel_lands_in_its_sections_and_round_trips(board, workspace):
    from tuneforge.webui.form import PPO_KEYS, build_config, config_tree, load_args, save_args

    assert ("ppo", "ppo") in board.fields["stage"].choices and set(PPO_KEYS) <= set(board.fields)
    panel = {"reward_model": "runs/rm", "reward_model_type": "lora", "ppo_buffer_size": 2, "ppo_epochs": 2,
             "ppo_target": 3.0, "ppo_score_norm": True, "ppo_whiten_rewards": True}
    values = tiny_values(workspace, stage="ppo", **panel)
    tree = config_tree(values, workspace)
    assert tree["reward_model"] == {"path": str(workspace.runs_dir / "rm")}  # lora: the default type
    assert tree["ppo"] == {"buffer_size": 2, "epochs": 2, "target": 3.0, "score_norm": True, "whiten_rewards": True}
    assert "ppo" not in config_tree(tiny_values(workspace, stage="grpo", reward_funcs="format", **panel), workspace)
    api = config_tree(tiny_values(workspace, stage="ppo", reward_model="http://127.0.0.1:8000/v1/score/evaluation",
                                  reward_model_type="api"), workspace)
    assert api["reward_model"]["path"] == "http://127.0.0.1:8000/v1/score/evaluation"
    for escape in ({"reward_model": "/etc"}, {"extra_args": "reward_model.path=/etc"},
                   {"extra_args": "reward_model.adapters=[/etc]"}):
        with pytest.raises(PathRefused):
            config_tree(tiny_values(workspace, stage="ppo", **{**panel, **escape}), workspace)
    saved = build_config(values, workspace)
    loaded = load_args(workspace, save_args(values, workspace, "ppo_args").name)
    assert {k: loaded[k] for k in panel} == panel and loaded["extra_args"] == ""
    assert build_config(loaded, workspace) == saved
