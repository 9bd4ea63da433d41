"""Built-in games: ``guess_number``, the smallest multi-turn environment with feedback to learn from.

``guess_number(lo=1, hi=50, max_turns=8, shaped=false, strict=false, invalid_penalty=0)``: the
environment holds a secret whole number in [lo, hi]; each turn the model says a number (the last integer
in its text counts), and the environment answers "Higher." or "Lower."; a text with no integer gets "Say
one number." and uses the turn. ``strict=true`` counts a turn only when it holds exactly one distinct
integer ("7", "I say 7."): a text with several ("You have 4 guesses, so 5") gets "Say one number." too.
Measured on the embedded model (README): under the default rule GRPO learned to write sentences full of
numbers ("I will say 5. You have 1 guess." counts as 1), a reward hack the rule allows and strict closes.
Binary search needs ceil(log2(hi - lo + 2)) guesses (6 for 1..50), so the default 8 turns leave room.
Reward: 1 on success, 0 otherwise, given on the last turn; ``shaped=true`` pays fewer guesses more:
``1 - 0.5 * (guesses - 1) / (max_turns - 1)`` on success (1 on the first guess, 0.5 on the last), still 0 on
failure. ``invalid_penalty=p`` adds a turn reward of ``-p`` to each turn that holds no guess (the "Say
one number." turns), the invalid-move penalty of textarena's games: a denser signal for the form of the
answer than success alone. ``info``: ``success`` (1.0/0.0), ``guesses`` (turns used) and ``invalid``
(turns without a guess), on the last step.

The counts of guesses are written in words ("You have four guesses.", "(three guesses left)"): with
digits, GRPO under the strict rule learned to echo the counter ("You have 4 guesses left." then "You
have 3 guesses left."), a valid guess each turn that walks 4, 3, 2, 1 and wins whenever the secret is at
most 4 (measured on the embedded model, seen on the review page).

Rows are ``{"secret": s}``: a stable hash of the secret (``posttrain.envs.base.split_values``) puts 1
secret in 10 in ``test``, so held-out episodes hide numbers never hidden in training. The departure
from the usual "guess the number" of textarena: the feedback is a plain word, without the running
history of guesses (the conversation already holds it); the first message shows the answer's form
with an example, the middle of the range (without it the embedded model answers the game with prose:
its greedy first turn held no number).
"""

from __future__ import annotations

import random
import re

from posttrain.envs.base import Environment, EnvError, Step, split_values

_INTEGER = re.compile(r"[-\u2212]?\d+")
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen twenty").split()


def spelled(n: int) -> str:
    """``n`` in words up to twenty ("four"), else in digits: the game's counts of guesses."""
    return _WORDS[n] if 0 <= n < len(_WORDS) else str(n)
_FEEDBACK = {True: "Higher.", False: "Lower."}  # keyed by "the secret is higher than the guess"


def last_integer(text: str) -> int | None:
    """The last integer written in ``text`` ("I guess 25." -> 25), or None."""
    found = _INTEGER.findall(text or "")
    return int(found[-1].replace("\u2212", "-")) if found else None


def only_integer(text: str) -> int | None:
    """The integer of a text that holds exactly one distinct integer ("I say 7." -> 7), else None."""
    found = {int(x.replace("\u2212", "-")) for x in _INTEGER.findall(text or "")}
    return found.pop() if len(found) == 1 else None


class GuessNumber(Environment):
    name = "guess_number"
    description = ("guess a secret number in [lo, hi] from 'higher'/'lower' feedback; options: lo=1, hi=50, "
                   "max_turns=8, shaped=false, strict=false, invalid_penalty=0")

    def __init__(self, lo: int = 1, hi: int = 50, max_turns: int = 8, shaped: bool = False, strict: bool = False,
                 invalid_penalty: float = 0.0):
        if hi <= lo:
            raise EnvError(f"guess_number: hi must be greater than lo, got lo={lo}, hi={hi}")
        if hi - lo > 1_000_000:
            raise EnvError(f"guess_number: the range lo..hi holds at most 1,000,001 numbers, got {hi - lo + 1}")
        if max_turns < 1:
            raise EnvError(f"guess_number: max_turns must be >= 1, got {max_turns}")
        if not 0 <= invalid_penalty <= 1:
            raise EnvError(f"guess_number: invalid_penalty must be in [0, 1], got {invalid_penalty}")
        self.lo, self.hi, self.max_turns, self.shaped, self.strict = lo, hi, max_turns, shaped, strict
        self.invalid_penalty = float(invalid_penalty)
        self.secret: int | None = None
        self.guesses = self.invalid = 0

    def rows(self, split: str, n: int, seed: int) -> list[dict]:
        pool = range(self.lo, self.hi + 1)
        return [{"secret": s} for s in split_values(pool, split, n, seed, key="guess_number/secret")]

    def reset(self, row: dict, seed: int) -> list[dict]:
        secret = row.get("secret")
        if secret is None:  # a row without a secret: draw one from the seed
            secret = random.Random(f"posttrain/guess_number/{seed}").randint(self.lo, self.hi)
        if not isinstance(secret, int) or not self.lo <= secret <= self.hi:
            raise EnvError(f"guess_number: row secret {secret!r} is not an integer in {self.lo}..{self.hi}")
        self.secret, self.guesses, self.invalid = secret, 0, 0
        return [{"role": "user", "content": (
            f"I am thinking of a whole number between {self.lo} and {self.hi}. Guess it: reply with one number "
            f"only (for example: {(self.lo + self.hi) // 2}) and I will answer 'Higher.' or 'Lower.'. You have "
            f"{spelled(self.max_turns)} guesses.")}]

    def _reward(self) -> float:
        if not self.shaped or self.max_turns == 1:
            return 1.0
        return 1.0 - 0.5 * (self.guesses - 1) / (self.max_turns - 1)

    def step(self, assistant_text: str) -> Step:
        if self.secret is None:
            raise RuntimeError("guess_number: step before reset")
        self.guesses += 1
        guess = only_integer(assistant_text) if self.strict else last_integer(assistant_text)
        self.invalid += guess is None
        penalty = -self.invalid_penalty if guess is None else 0.0
        if guess == self.secret or self.guesses >= self.max_turns:
            won = guess == self.secret
            info = {"success": float(won), "guesses": float(self.guesses), "invalid": float(self.invalid)}
            return Step([], reward=(self._reward() if won else 0.0) + penalty, done=True, info=info)
        left = self.max_turns - self.guesses
        feedback = "Say one number." if guess is None else _FEEDBACK[self.secret > guess]
        return Step([{"role": "user", "content": f"{feedback} ({spelled(left)} guess{'es' if left > 1 else ''} left)"}],
                    reward=penalty)


__all__ = ["GuessNumber", "last_integer", "only_integer", "spelled"]
