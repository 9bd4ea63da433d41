"""Multi-turn environments (posttrain.envs): the spec a user writes and its errors, the fault guard,
the built-in environments played with scripted turns, and the textarena adapter on real games.
No model: every assistant turn here is a string written by the test."""

from __future__ import annotations

import time

import pytest

from posttrain import rewards
from posttrain.data.tasks import TaskError, get_task
from posttrain.envs import EnvError, Environment, GuardCounts, Guarded, Step, UnknownEnvError, get_env, list_envs, \
    parse_env, run_step
from posttrain.envs.games import last_integer, only_integer, spelled
from posttrain.errors import UserError


# ----------------------------------------------------------------------------- specs


def test_a_spec_names_a_builtin_with_its_options():
    factory = get_env("guess_number(hi=100, max_turns=10)")
    env = factory()
    assert (type(env).__name__, env.lo, env.hi, env.max_turns) == ("GuessNumber", 1, 100, 10)
    assert factory.max_turns == 10 and factory.tools == () and factory.name == "guess_number"
    assert factory() is not env  # one instance per episode
    assert get_env("guess_number").options == {}
    assert parse_env("single_turn(task='rg:chain_sum(min_terms=3)', reward=math)")[1] == {
        "task": "rg:chain_sum(min_terms=3)", "reward": "math"}  # quotes keep commas and parentheses
    names = {e.name: e for e in list_envs()}
    assert {"single_turn", "guess_number", "tool_arithmetic"} <= set(names)
    assert names["tool_arithmetic"].tools == ("calculator",) and not names["single_turn"].multi_turn
    assert any(n.startswith("ta:") for n in names)


@pytest.mark.parametrize("spec,fragment", [
    ("guess_numbr", "unknown environment 'guess_numbr' (did you mean 'guess_number'?)"),
    ("guess_number(hii=3)",
     "has no option 'hii' (did you mean 'hi'?); its options: lo, hi, max_turns, shaped, strict, invalid_penalty"),
    ("guess_number(invalid_penalty=2)", "invalid_penalty must be in [0, 1], got 2"),
    ("guess_number(hi=big)", "option hi='big' must be an integer"),
    ("guess_number(shaped=3)", "option shaped=3 must be true or false"),
    ("guess_number(lo=5, hi=3)", "hi must be greater than lo"),  # the environment's own check, at spec time
    ("guess_number(hi=3, hi=4)", "given twice"),
    ("guess_number(hi=100", "cannot read the environment"),
    ("guess_number(100)", "cannot read '100': write key=value"),
    ("single_turn", "needs the option 'task'"),
    ("", "empty environment spec"),
    ("no_such_module_xyz:Env", "cannot import module 'no_such_module_xyz'"),
    ("posttrain.envs.games:GuessNumbr", "has no attribute 'GuessNumbr' (did you mean 'GuessNumber'?)"),
    ("posttrain.envs.games:last_integer", "is not a subclass of posttrain.envs.Environment"),
])
def test_bad_specs_are_user_errors_that_say_what_is_wrong(spec, fragment):
    with pytest.raises(EnvError) as caught:
        get_env(spec)
    assert isinstance(caught.value, UserError)
    assert fragment in str(caught.value)


def test_unknown_env_is_also_a_key_error_and_single_turn_checks_its_task_now():
    with pytest.raises(KeyError):
        get_env("nonesuch")
    with pytest.raises(UnknownEnvError):
        get_env("nonesuch")
    with pytest.raises(TaskError, match="must be an integer in 1..18"):
        get_env("single_turn(task='arithmetic(digits=99)')")
    with pytest.raises(rewards.RewardSpecError, match="unknown reward 'mathh'"):
        get_env("single_turn(task=arithmetic, reward=mathh)")


def test_a_users_class_is_imported_from_module_colon_class(tmp_path, monkeypatch):
    (tmp_path / "my_envs_for_test.py").write_text(
        "from posttrain.envs import Environment, Step\n"
        "class Echo(Environment):\n"
        "    name = 'echo'\n"
        "    def __init__(self, times: int = 1, tag: str | None = None):\n"
        "        self.times, self.tag = times, tag\n"
        "    def reset(self, row, seed):\n"
        "        return [{'role': 'user', 'content': 'say hi'}]\n"
        "    def step(self, text):\n"
        "        return Step([], reward=float(text == 'hi' * self.times), done=True)\n"
        "class NotAnEnv:\n"
        "    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    factory = get_env("my_envs_for_test:Echo(times=2)")
    assert factory.name == "echo"
    env = factory()
    assert env.reset({}, 0)[0]["content"] == "say hi"
    assert env.step("hihi").reward == 1.0
    assert get_env("my_envs_for_test:Echo(tag=none)").options == {"tag": None}  # str | None takes none
    with pytest.raises(EnvError, match="option times='x' must be an integer"):
        get_env("my_envs_for_test:Echo(times=x)")
    with pytest.raises(EnvError, match="my_envs_for_test.NotAnEnv is not a subclass"):
        get_env("my_envs_for_test:NotAnEnv")
    assert len({r["seed"] for r in factory.rows("train", 50, 0)}) == 50  # the base class's rows: episode seeds
    assert not {r["seed"] for r in factory.rows("train", 200, 0)} & {r["seed"] for r in factory.rows("test", 50, 0)}


# ----------------------------------------------------------------------------- the guard


class Faulty(Environment):
    """Misbehaves as told: raise, hang, flood, or return something that is not a Step."""

    def __init__(self, mode: str = "ok"):
        self.mode = mode

    def reset(self, row, seed):
        return [{"role": "user", "content": "go"}]

    def step(self, text):
        if self.mode == "raise":
            raise ValueError("board is on fire")
        if self.mode == "hang":
            time.sleep(5)
        if self.mode == "flood":
            return Step([{"role": "user", "content": "x" * 5000}])
        if self.mode == "not_a_step":
            return {"messages": []}
        if self.mode == "bad_message":
            return Step([{"role": "user", "content": 42}])
        if self.mode == "bad_role":
            return Step([{"role": "assistant", "content": "I am you"}])
        if self.mode == "nan_reward":
            return Step([], reward=float("nan"), done=True)
        return Step([{"role": "user", "content": "fine"}], reward=0.5)


@pytest.mark.parametrize("mode,error", [
    ("raise", "exception: ValueError: board is on fire"),
    ("hang", "timeout"),
    ("flood", "oversized: 5000 characters > 1000"),
    ("not_a_step", "malformed: step must return a Step, got dict"),
    ("bad_message", "malformed: message 0 content must be a string, got int"),
    ("bad_role", "malformed: message 0 has role 'assistant'"),
    ("nan_reward", "malformed: reward must be a finite number"),
])
def test_a_faulty_environment_ends_its_episode_with_a_recorded_error(mode, error):
    counts = GuardCounts()
    env = Faulty(mode)
    start = time.monotonic()
    assert run_step(env, env.reset, {}, 0, timeout_s=0.2, counts=counts).messages == [{"role": "user", "content": "go"}]
    step = run_step(env, env.step, "move", timeout_s=0.2, max_output_chars=1000, counts=counts)
    assert time.monotonic() - start < 2  # a hang is abandoned at the deadline, not waited for
    assert (step.done, step.reward, step.messages) == (True, 0.0, [])
    assert step.info["env_error"].startswith(error)
    kind = error.partition(":")[0]
    assert getattr(counts, kind) == 1 and counts.errors == 1 and counts.calls == 2
    assert counts.metrics()[f"env/errors/{kind}"] == 1.0


def test_a_healthy_step_passes_the_guard_unchanged_and_a_failed_env_is_not_reused():
    counts = GuardCounts()
    ok = Guarded(Faulty("ok"), timeout_s=0.2, counts=counts)
    assert ok.reset({}, 0).messages[0]["content"] == "go"
    assert ok.step("x") == Step([{"role": "user", "content": "fine"}], reward=0.5)
    assert counts.errors == 0 and counts.calls == 2
    bad = Guarded(Faulty("raise"), timeout_s=None, counts=counts)  # inline: no thread
    bad.reset({}, 0)
    assert bad.step("x").info["env_error"].startswith("exception: ValueError")
    with pytest.raises(RuntimeError, match="make a new one"):
        bad.step("again")
    bad.close()
    assert counts.exception == 1


class BadReset(Faulty):
    def reset(self, row, seed):
        return {"mode": self.mode}[row["key"]]  # a string (not messages); a row without "key": KeyError


@pytest.mark.parametrize("mode,error", [
    ("", "malformed: messages must be a list, got str"),
    ("hello", "malformed: messages must be a list, got str"),
])
def test_a_reset_that_returns_no_messages_is_a_recorded_error(mode, error):
    env, counts = BadReset(mode), GuardCounts()
    assert run_step(env, env.reset, {"key": "mode"}, 0, counts=counts).info["env_error"].startswith(error)
    assert run_step(env, env.reset, {}, 0, counts=counts).info["env_error"] == "exception: KeyError: 'key'"
    assert (counts.malformed, counts.exception) == (1, 1)

    class Empty(Faulty):
        def reset(self, row, seed):
            return []

    empty = Empty()
    assert run_step(empty, empty.reset, {}, 0).info["env_error"] == "malformed: reset returned no messages"


# ----------------------------------------------------------------------------- guess_number


def play(env, turns: list[str], row: dict, seed: int = 0) -> list[Step]:
    env.reset(row, seed)
    steps = []
    for text in turns:
        steps.append(env.step(text))
        if steps[-1].done:
            break
    return steps


def binary_search(env, row) -> list[Step]:
    env.reset(row, 0)
    lo, hi, steps = env.lo, env.hi, []
    while True:
        guess = (lo + hi) // 2
        steps.append(env.step(f"My guess is {guess}."))
        if steps[-1].done:
            return steps
        if steps[-1].messages[0]["content"].startswith("Higher"):
            lo = guess + 1
        else:
            hi = guess - 1


def test_guess_number_binary_search_wins_and_bad_guessing_loses():
    factory = get_env("guess_number")
    for row in factory.rows("test", 5, 0) + factory.rows("train", 20, 0):
        steps = binary_search(factory(), row)
        assert steps[-1].reward == 1.0
        assert steps[-1].info == {"success": 1.0, "guesses": float(len(steps)), "invalid": 0.0}
        assert len(steps) <= 6  # ceil(log2(51))
        assert sum(s.reward for s in steps[:-1]) == 0
    env = factory()
    steps = play(env, ["1"] * 20, {"secret": 37})
    assert len(steps) == 8 and steps[-1].done and steps[-1].reward == 0.0 and steps[-1].info["success"] == 0.0
    assert steps[0].messages == [{"role": "user", "content": "Higher. (seven guesses left)"}]  # no digit to echo
    steps = play(env, ["I don't know", "50 is too high, so 20", "37"], {"secret": 37})
    assert [s.messages[0]["content"].split(".")[0] for s in steps[:2]] == ["Say one number", "Higher"]
    assert steps[2].reward == 1.0 and steps[2].info["guesses"] == 3.0
    shaped = get_env("guess_number(shaped=true, max_turns=5)")()
    assert play(shaped, ["10", "37"], {"secret": 37})[-1].reward == pytest.approx(1 - 0.5 * 1 / 4)
    assert last_integer("between 1 and 50, say 25") == 25 and last_integer("none") is None
    strict = get_env("guess_number(strict=true)")()
    steps = play(strict, ["I will say 37. You have 7 guesses.", "37 or 37", "37"], {"secret": 37})
    assert steps[0].messages[0]["content"].startswith("Say one number") and steps[1].reward == 1.0
    assert only_integer("I say 7.") == 7 and only_integer("4 guesses, so 5") is None and only_integer("") is None
    assert "You have eight guesses." in get_env("guess_number")().reset({"secret": 3}, 0)[0]["content"]
    assert spelled(1) == "one" and spelled(20) == "twenty" and spelled(21) == "21"
    penalised = get_env("guess_number(strict=true, invalid_penalty=0.25, max_turns=3)")()
    steps = play(penalised, ["hm", "36 or 38", "37"], {"secret": 37})
    assert [s.reward for s in steps] == [-0.25, -0.25, 1.0] and steps[-1].info["invalid"] == 2.0
    steps = play(penalised, ["20", "no idea", "30"], {"secret": 37})
    assert [s.reward for s in steps] == [0.0, -0.25, 0.0] and steps[-1].info == {"success": 0.0, "guesses": 3.0,
                                                                                  "invalid": 1.0}
    assert play(penalised, ["x", "y", "z"], {"secret": 37})[-1].reward == -0.25  # the last turn's own penalty


def test_guess_number_train_and_test_secrets_are_disjoint_and_seeded():
    factory = get_env("guess_number(hi=1000)")
    train, test = factory.rows("train", 500, 0), factory.rows("test", 50, 0)
    assert not {r["secret"] for r in train} & {r["secret"] for r in test}
    assert factory.rows("train", 500, 0) == train and factory.rows("train", 500, 1) != train
    with pytest.raises(EnvError, match="split must be one of train, test"):
        factory.rows("dev", 5, 0)
    with pytest.raises(EnvError, match="not an integer in 1..1000"):
        factory().reset({"secret": 5000}, 0)


# ----------------------------------------------------------------------------- single_turn


def test_single_turn_gives_the_rewards_of_the_reward_function_on_the_same_text():
    factory = get_env("single_turn(task=arithmetic)")
    rows = factory.rows("test", 20, 0)
    assert rows == get_task("arithmetic", "test", n=20, seed=0)
    reward_fn = rewards.from_spec("math")
    seen = []
    for i, row in enumerate(rows):
        env = factory()
        assert env.reset(row, 0) == [{"role": "user", "content": row["prompt"]}]
        text = f"Let me add. Answer: {int(row['answer']) + (i % 2)}"  # right for even rows, wrong for odd
        step = env.step(text)
        expected = reward_fn(row["prompt"], text, **{k: v for k, v in row.items() if k != "prompt"})
        assert step.done and step.messages == [] and step.reward == expected
        seen.append(step.reward)
    assert seen == [1.0, 0.0] * 10
    combined = get_env("single_turn(task=arithmetic, reward='math,format:0.5')")()
    combined.reset(rows[0], 0)
    step = combined.step(f"I add them.\nAnswer: {rows[0]['answer']}")
    assert step.reward == 1.5 and step.info["reward/math"] == 1.0 and step.info["reward/format"] == 1.0


# ----------------------------------------------------------------------------- tool_arithmetic


def test_tool_arithmetic_rewards_a_correct_answer_after_a_tool_call():
    pytest.importorskip("posttrain.envs.tools", reason="posttrain.envs.tools (the tools helper's) not written yet")
    factory = get_env("tool_arithmetic")
    assert [t.__name__ for t in factory.tools] == ["calculator"] and factory.max_turns == 4
    row = factory.rows("test", 1, 0)[0]
    a, b = row["a"], row["b"]
    assert 100 <= a <= 9999 and 100 <= b <= 9999 and row["answer"] == str(a * b)
    env = factory()
    env.reset(row, 0)
    call = f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{a} * {b}"}}}}</tool_call>'
    first = env.step(call)
    assert not first.done and first.messages[0]["role"] == "tool" and str(a * b) in first.messages[0]["content"]
    last = env.step(f"The product is {a * b}. Answer: {a * b}")
    assert last.done and last.reward == 1.0
    assert last.info == {"correct": 1.0, "tool_calls": 1.0, "tool_errors": 0.0, "tool_parse_failures": 0.0}
    env.reset(row, 0)
    wrong = env.step(f"Answer: {a * b + 1}")
    assert wrong.done and wrong.reward == 0.0 and wrong.info["correct"] == 0.0 and wrong.info["tool_calls"] == 0.0
    env.reset(row, 0)
    bad = env.step('<tool_call>{"name": "calculater", "arguments": {}}</tool_call>')  # the model's typo
    assert not bad.done and bad.messages[0]["content"].startswith("error: unknown tool")
    assert env.step("Answer: 1").info["tool_parse_failures"] == 1.0
    env.reset(row, 0)
    steps = [env.step(call) for _ in range(4)]
    assert [s.done for s in steps] == [False, False, False, True] and steps[-1].reward == 0.0
    train, test = factory.rows("train", 300, 0), factory.rows("test", 30, 0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


# ----------------------------------------------------------------------------- textarena


def test_textarena_guess_the_number_played_by_binary_search_is_won():
    pytest.importorskip("textarena")
    import random

    factory = get_env("ta:GuessTheNumber-v0")
    assert factory.max_turns == 10 and factory.name == "ta:GuessTheNumber-v0"
    before = random.getstate()
    for row in factory.rows("test", 3, 0):
        env = factory()
        first = env.reset(row, 0)
        assert "between 1 and 20" in first[0]["content"]
        lo, hi = 1, 20
        for _ in range(10):
            guess = (lo + hi) // 2
            step = env.step(f"I guess [{guess}]")
            if step.done:
                break
            hint = step.messages[0]["content"]
            assert hint in ("The target number is higher.", "The target number is lower.")
            lo, hi = (guess + 1, hi) if "higher" in hint else (lo, guess - 1)
        assert step.done and step.reward == 1.0 and step.info["ta_reward"] == 1.0 and step.info["turns"] <= 5
    assert random.getstate() == before  # textarena's reseeding of `random` does not leak out
    same = [factory() for _ in range(2)]
    assert same[0].reset({"seed": 7}, 0) == same[1].reset({"seed": 7}, 0)
    assert same[0].step("[10]") == same[1].step("[10]")  # a game is a function of its seed


def test_textarena_tower_of_hanoi_solved_and_failed_through_the_adapter():
    pytest.importorskip("textarena")
    factory = get_env("ta:TowerOfHanoi-v0")
    env = factory()
    assert "Tower of Hanoi with 3 disks" in env.reset({"seed": 1}, 0)[0]["content"]
    optimal = ["[A C]", "[A B]", "[C B]", "[A C]", "[B A]", "[B C]", "[A C]"]
    steps = [env.step(move) for move in optimal]
    assert [s.done for s in steps] == [False] * 6 + [True]
    assert steps[0].messages[0]["content"].startswith("You moved disk 1 from A to C.")  # no echo of the move
    assert steps[-1].reward == 1.0 and steps[-1].info["invalid_move"] == 0.0
    env.reset({"seed": 1}, 0)
    refused = env.step("hello")  # no [source target]: the game's own feedback, the game goes on
    assert not refused.done and "invalid move" in refused.messages[0]["content"]
    second = env.step("still no brackets")  # a second invalid move in a row ends the game
    assert second.done and second.reward == 0.0 and second.info["invalid_move"] == 1.0
    assert "env_error" not in second.info


@pytest.mark.parametrize("spec,fragment", [
    ("ta:Wordle-v0", "needs nltk data that is not on disk (averaged_perceptron_tagger_eng words)"),
    ("ta:TicTacToe-v0", "is not a single-player game"),
    ("ta:GuessTheNumbr-v0", "did you mean 'ta:GuessTheNumber-v0'?"),
    ("ta:GuessTheNumber-v0(max_nuber=30)", "has no option 'max_nuber' (did you mean 'max_number'?)"),
    ("ta:GuessTheNumber-v0(max_number=lots)", "option max_number='lots' must be an integer"),
])
def test_textarena_games_that_cannot_run_are_refused_when_the_spec_is_read(spec, fragment, tmp_path, monkeypatch):
    pytest.importorskip("textarena")
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # no nltk data, whatever this machine has
    with pytest.raises(EnvError) as caught:
        get_env(spec)
    assert fragment in str(caught.value)
