"""Reward functions: loading from config entries, TRL's calling convention and None rule, weights, built-ins."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from tuneforge.errors import ConfigError
from tuneforge.rewards import BUILTINS, RewardSet, load_reward_function, reward_metrics

PROMPTS = ["1+1=", "1+1=", "2+3=", "2+3="]
COMPLETIONS = ["2", "3", "5", "five"]
IDS = [[10], [11], [12], [13, 14]]
COLUMNS = {"answer": ["2", "2", "5", "5"], "level": [1, 1, 3, 3]}

TRL_STYLE = '''
SEEN = []

def solved(prompts, completions, completion_ids, **kwargs):
    """A TRL reward function: level if the completion equals the answer column, else None."""
    SEEN.append(kwargs)
    return [lvl if c == a else None for c, a, lvl in zip(completions, kwargs["answer"], kwargs["level"])]

def short(completions, **kwargs):
    return [1.0 / len(c) for c in completions]

NOT_A_FUNCTION = 3
'''


def write(tmp_path, name="my_rewards.py", text=TRL_STYLE):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def nan_list(x: torch.Tensor) -> list:
    return [None if math.isnan(v) else v for v in x.tolist()]


# ------------------------------------------------------------------------------------------ loading and calling


def test_trl_function_from_file_receives_extra_columns(tmp_path):
    write(tmp_path)
    rewards = RewardSet(["my_rewards.py:solved"], base_dir=tmp_path)
    total, per_function, names = rewards(PROMPTS, COMPLETIONS, IDS, COLUMNS, trainer_state="state")
    assert names == ["solved"]
    seen = rewards.functions[0].fn.__globals__["SEEN"][0]
    assert seen == {"answer": COLUMNS["answer"], "level": COLUMNS["level"], "trainer_state": "state"}
    # rows 0 and 2 are right (levels 1 and 3); rows 1 and 3 return None -> NaN per function, 0 in the total
    assert nan_list(per_function[:, 0]) == [1.0, None, 3.0, None]
    assert total.tolist() == [1.0, 0.0, 3.0, 0.0]


def test_absolute_path_and_module_entries(tmp_path, monkeypatch):
    path = write(tmp_path)
    write(tmp_path, "reward_mod_for_test.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "reward_mod_for_test", raising=False)
    rewards = RewardSet([f"{path}:short", "reward_mod_for_test:short"], weights=[1.0, 2.0])
    total, _, names = rewards(PROMPTS, COMPLETIONS, IDS, COLUMNS)
    assert names == ["short", "short_2"]
    # 1/len(c) * (1 + 2): lengths 1, 1, 1, 4
    assert total.tolist() == pytest.approx([3.0, 3.0, 3.0, 0.75])


def test_none_handling_and_weights_as_trl():
    def first(completions, **kwargs):
        return [1.0, None, None, 4.0]

    def second(completions, **kwargs):
        return [None, 2.0, None, 1.0]

    rewards = RewardSet([first, second], weights=[1.0, 0.5])
    total, per_function, names = rewards(PROMPTS, COMPLETIONS, IDS, COLUMNS)
    # nansum of w_k r_k: [1, 0.5 * 2, (all None) 0, 4 + 0.5 * 1]
    assert total.tolist() == [1.0, 1.0, 0.0, 4.5]
    assert nan_list(per_function[:, 0]) == [1.0, None, None, 4.0]
    metrics = reward_metrics(total, per_function, names, group_size=2)
    # per function: mean and Bessel std over the samples it scored ([1, 4] and [2, 1])
    assert metrics["rewards/first/mean"] == 2.5
    assert metrics["rewards/first/std"] == pytest.approx(math.sqrt(4.5))
    assert metrics["rewards/second/mean"] == 1.5
    # groups [1, 1] (std 0) and [0, 4.5] (std 4.5 / sqrt 2)
    assert metrics["reward"] == pytest.approx(6.5 / 4)
    assert metrics["reward_std"] == pytest.approx((4.5 / math.sqrt(2)) / 2)
    assert metrics["frac_reward_zero_std"] == 0.5


def test_async_functions_and_functions_without_kwargs():
    async def slow_one(completions, **kwargs):
        return [1.0] * len(completions)

    def only_ids(completion_ids):
        return [float(len(ids)) for ids in completion_ids]

    total, _, _ = RewardSet([slow_one, only_ids])(PROMPTS, COMPLETIONS, IDS, COLUMNS)
    assert total.tolist() == [2.0, 2.0, 2.0, 3.0]


def test_wrong_outputs_name_the_function():
    def too_short(completions, **kwargs):
        return [1.0]

    def words(completions, **kwargs):
        return ["good"] * len(completions)

    with pytest.raises(ConfigError, match="'too_short' returned 1 rewards for 4 completions"):
        RewardSet([too_short])(PROMPTS, COMPLETIONS, IDS, COLUMNS)
    with pytest.raises(ConfigError, match="'words' returned 'good'"):
        RewardSet([words])(PROMPTS, COMPLETIONS, IDS, COLUMNS)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("missing.py:fn", r"missing.py:fn'.*does not exist \(relative paths are taken from the folder tuneforge runs in"),
        ("my_rewards.py:solve", r"my_rewards.py:solve'.*has no function 'solve'. Did you mean 'solved'"),
        ("my_rewards.py:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is not callable \\(its type is int\\)"),
        ("no_such_module_xyz:fn", "module 'no_such_module_xyz' cannot be imported"),
        ("acuracy", "unknown built-in reward function. Did you mean 'accuracy'"),
        ({"func": "length", "max_lines": 3}, "unknown setting in \\['max_lines'\\]; 'length' takes max_words"),
        ({"max_words": 3}, "has no 'func' key"),
    ],
)
def test_loading_errors(tmp_path, entry, message):
    write(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_reward_function(entry, base_dir=tmp_path)


def test_weights_must_match_functions():
    with pytest.raises(ConfigError, match="reward_weights has 1 values but reward_funcs has 2"):
        RewardSet(["format", "length"], weights=[1.0])


def test_settings_and_builtin_prefix():
    fn = load_reward_function({"func": "builtin:length", "max_words": 2})
    assert fn.name == "length"
    assert fn.fn(completions=["a b", "a b c"]) == [1.0, 0.5]
    assert sorted(BUILTINS.names()) == ["accuracy", "format", "length", "repetition"]


# ------------------------------------------------------------------------------------------ built-ins


def builtin(entry):
    return load_reward_function(entry).fn


def test_accuracy():
    completions = [
        "42",
        "The answer is 42.",  # numeric gold: the last number counts
        "<answer> 1,000 </answer>",
        r"so \boxed{\frac{1}{2}}",
        "41",
        "Paris",
        "anything",
        [{"role": "assistant", "content": " Paris "}],  # TRL's conversational form
    ]
    gold = ["42", "42", "1000", "0.5", "42", "paris", None, "Paris"]
    assert builtin("accuracy")(completions=completions, solution=gold) == [
        1.0, 1.0, 1.0, 1.0, 0.0, 0.0, None, 1.0
    ]
    # the 'answer' column is the fallback, a named column wins
    assert builtin("accuracy")(completions=["7"], answer=["7"]) == [1.0]
    assert builtin({"func": "accuracy", "column": "target"})(completions=["7"], target=["8"], answer=["7"]) == [0.0]
    with pytest.raises(ConfigError, match="needs the dataset column 'solution' or 'answer'.*\\['level'\\]"):
        builtin("accuracy")(completions=["7"], level=[1])


def test_format():
    good = "<think>\nadd them\n</think>\n<answer>4</answer>\n"
    assert builtin("format")(completions=[good, "<answer>4</answer>", good + "extra"]) == [1.0, 0.0, 0.0]
    assert builtin({"func": "format", "pattern": r"\d+"})(completions=["123", "12a"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="not a valid regex"):
        builtin({"func": "format", "pattern": "(unclosed"})


def test_length():
    # default 50 words: 50 -> 1.0, 60 -> 1 - 10/50 = 0.8, 100 and more -> 0
    texts = [" ".join(["w"] * n) for n in (50, 60, 100, 130)]
    assert builtin("length")(completions=texts) == pytest.approx([1.0, 0.8, 0.0, 0.0])
    # Chinese counts character by character, other text by runs of non-space characters:
    # "我是一个助手" 6 -> 1 - 2/4; "我叫 Tune Forge。啊" 我 叫 Tune Forge。 啊 = 5 -> 1 - 1/4; "a  b\n" 2 -> 1
    assert builtin({"func": "length", "max_words": 4})(completions=["我是一个助手", "我叫 Tune Forge。啊", "a  b\n"]) == \
        pytest.approx([0.5, 0.75, 1.0])
    # tokens: limit 4, 5 tokens -> 1 - 1/4
    assert builtin({"func": "length", "max_tokens": 4})(completions=["", ""], completion_ids=[[1] * 4, [1] * 5]) == [
        1.0, 0.75
    ]


def test_repetition():
    # "a b c a b c": trigrams abc, bca, cab, abc -> 3 distinct of 4 -> -1 * (1 - 3/4)
    # "x y z w": 2 trigrams, both distinct -> 0;  "A a": shorter than 3 words -> 0
    out = builtin("repetition")(completions=["a b c A B C", "x y z w", "A a"])
    assert out == pytest.approx([-0.25, 0.0, 0.0])
    # bigrams of "a a a a": aa x 3 -> 1 distinct of 3 -> -0.5 * 2/3
    assert builtin({"func": "repetition", "ngram_size": 2, "max_penalty": -0.5})(completions=["a a a a"]) == (
        pytest.approx([-1 / 3])
    )
