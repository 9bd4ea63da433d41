"""The textarena adapter: ``ta:ENV_ID`` plays a single-player textarena game as an environment.

``ta:GuessTheNumber-v0``, ``ta:TowerOfHanoi-v0``, ``ta:FrozenLake-v0``, ``ta:Minesweeper-v0(rows=5, cols=5,
num_mines=3)``: any id of textarena's registry (PyPI ``textarena``, checked with 0.7.4); options in
parentheses go to the game's constructor (``textarena.make(ENV_ID, **options)``), checked against its
signature. Per episode: ``reset(num_players=1, seed=row["seed"])``; the game's opening messages
(rules, board) are the first user message; each assistant turn is the game's action
(``env.step(action=text)``) and the game's new messages are the next user message; at the end,
the reward is the game's own (``env.close()`` -> rewards of player 0: 1 for a win, and for a loss or
a second invalid move a fraction of completion that the game defines, often 0), given on the last
turn, with ``info`` ``{"ta_reward", "invalid_move", "turns", "reason"}``. A move the game refuses
(no ``[...]``, an illegal move) is the game's feedback ("You attempted an invalid move..."), not an
environment error; textarena ends the game at the second invalid move in a row.

Departures from ``textarena.make``'s defaults, on purpose:
  * the game runs without its observation wrapper (``LLMObservationWrapper`` repeats the whole history
    in every observation, which a chat already holds): each turn gives only the game's new messages,
    without the echo of the model's own move; the action wrapper's rule is kept (a text with no
    square bracket is sent as ``[text]``);
  * textarena seeds Python's global ``random`` at every reset: the game gets its own ``random`` state,
    swapped in around each call into it, so the trainer's global stream is untouched and a game is a
    function of its seed; calls into games are serialized by a lock for that (a game that hangs holds
    it: other games' calls then fail after ``LOCK_WAIT_S``, recorded by the guard as exceptions);
  * a game that would download data (the nltk word lists of Wordle, Hangman, Codenames, ...) is
    refused when the spec is read, with the command that downloads it once; it is never downloaded
    at run time. ``nltk.download`` is replaced, while textarena runs, by a check that the data is on disk.

Rows are ``{"seed": k}``, train and test seeds disjoint (``posttrain.envs.base.split_values``).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import random
import threading
from typing import Any, Iterator

from posttrain.envs.base import Environment, EnvError, Step, check_options, split_values

OFFLINE_GAMES: dict[str, str] = {
    "GuessTheNumber-v0": "guess a number in 1..20 in 10 turns from higher/lower hints, as [n]",
    "TowerOfHanoi-v0": "move 3 disks from tower A to C, as [A C]",
    "FrozenLake-v0": "walk a 4x4 frozen lake to the goal around holes, as [up]",
    "Minesweeper-v0": "clear an 8x8 minefield, as [row col]",
}
"""Single-player games checked to run offline (``posttrain.envs.list_envs`` shows them)."""

_NLTK_PLACES = ("corpora", "taggers", "tokenizers", "chunkers", "models", "misc", "grammars", "stemmers", "sentiment")
PLAYER = 0


_MISSING: list[str] = []
"""nltk data a game asked to download while ``_game_context`` was active (and that is not on disk)."""


def _nltk_offline(info_or_id: Any = None, *args: Any, **kwargs: Any) -> bool:
    """Stands in for ``nltk.download``: True when the data is on disk; else notes it in ``_MISSING``
    and returns False, as a failed download does (the game then raises its LookupError)."""
    import nltk

    names = info_or_id if isinstance(info_or_id, (list, tuple)) else [info_or_id]
    found = True
    for name in names:
        for place in _NLTK_PLACES:
            try:
                nltk.data.find(f"{place}/{name}")
                break
            except LookupError:
                continue
        else:
            _MISSING.append(str(name))
            found = False
    return found


_LOCK = threading.Lock()
LOCK_WAIT_S = 60.0
"""How long a call into a game waits for another game's call to finish (a hung game holds the lock)."""


@contextlib.contextmanager
def _game_context(rng_state: list) -> Iterator[None]:
    """While textarena runs: the game's own ``random`` state, and nltk that never downloads. Both are
    process-wide, so calls into games are serialized (games are quick)."""
    if not _LOCK.acquire(timeout=LOCK_WAIT_S):
        raise RuntimeError(f"another textarena game has not returned for {LOCK_WAIT_S:g} s")
    try:
        yield from _swapped(rng_state)
    finally:
        _LOCK.release()


def _swapped(rng_state: list) -> Iterator[None]:
    try:
        import nltk
    except ImportError:  # textarena requires it, but a game may not
        nltk = None
    outer = random.getstate()
    if rng_state:
        random.setstate(rng_state[0])
    saved = getattr(nltk, "download", None)
    if nltk is not None:
        nltk.download = _nltk_offline
    try:
        yield
    finally:
        if nltk is not None:
            nltk.download = saved
        rng_state[:] = [random.getstate()]
        random.setstate(outer)


def _textarena():
    try:
        import textarena
    except ImportError as e:
        raise EnvError(f"ta:... environments need the textarena package ({e}): pip install 'textarena>=0.7.4'") from e
    return textarena


def _entry_class(spec: Any) -> type:
    entry = spec.entry_point
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        return getattr(importlib.import_module(module), name)
    return entry


def _render(observation: list) -> str:
    """The game's messages of one turn as one text (the echo of the player's own move left out)."""
    def echo(sender: Any, kind: Any) -> bool:
        return sender == PLAYER or getattr(kind, "name", None) == "PLAYER_ACTION"

    return "\n\n".join(str(m[1]).strip() for m in observation if not echo(m[0], m[2] if len(m) > 2 else None)).strip()


class TextArenaEnv(Environment):
    name = "textarena"
    description = "a single-player textarena game: ta:GuessTheNumber-v0"

    def __init__(self, env_id: str, **game_options: Any):
        ta = _textarena()
        from textarena.envs.registration import ENV_REGISTRY

        spec = f"ta:{env_id}"
        if env_id not in ENV_REGISTRY:
            close = difflib.get_close_matches(env_id, list(ENV_REGISTRY), n=1)
            hint = f" (did you mean 'ta:{close[0]}'?)" if close else ""
            raise EnvError(f"textarena has no game {env_id!r}{hint}; games checked offline: "
                           + ", ".join(f"ta:{g}" for g in OFFLINE_GAMES))
        self.name, self.env_id, self.options, self._rng = spec, env_id, dict(game_options), []
        try:
            with _game_context(self._rng):
                _MISSING.clear()
                check_options(_entry_class(ENV_REGISTRY[env_id]), game_options, spec, ENV_REGISTRY[env_id].kwargs)
                game = ta.make(env_id, **game_options)
                while isinstance(game, ta.Wrapper):  # the bare game: see the module docstring
                    game = game.env
                game.reset(num_players=1, seed=0)  # a game for several players refuses one here
        except AssertionError as e:
            raise EnvError(f"{spec} is not a single-player game ({e}); textarena's multi-player games need "
                           "opponents, which posttrain does not provide") from e
        except LookupError as e:  # nltk data that is not on disk
            missing = " ".join(dict.fromkeys(_MISSING)) or str(e).strip().splitlines()[0]
            raise EnvError(f"{spec} needs nltk data that is not on disk ({missing}) and is not downloaded at run "
                           f"time: run `python -m nltk.downloader {missing}` once, or pick another game") from e
        if _MISSING:
            missing = " ".join(dict.fromkeys(_MISSING))
            raise EnvError(f"{spec} needs nltk data that is not on disk ({missing}): run "
                           f"`python -m nltk.downloader {missing}` once, or pick another game")
        self.game = game
        self.max_turns = getattr(game, "max_turns", None) if isinstance(getattr(game, "max_turns", None), int) else None
        self.turns = 0

    def rows(self, split: str, n: int, seed: int) -> list[dict]:
        return [{"seed": k} for k in split_values(range(2**31), split, n, seed, key=f"ta/{self.env_id}/seed")]

    def reset(self, row: dict, seed: int) -> list[dict]:
        episode_seed = row.get("seed", seed)
        self._rng.clear()
        with _game_context(self._rng):
            self.game.reset(num_players=1, seed=episode_seed)
            _, observation = self.game.get_observation()
        self.turns = 0
        return [{"role": "user", "content": _render(observation)}]

    def step(self, assistant_text: str) -> Step:
        action = assistant_text if ("[" in assistant_text or "]" in assistant_text) else f"[{assistant_text}]"
        with _game_context(self._rng):
            done, _ = self.game.step(action=action)
            self.turns += 1
            if not done:
                _, observation = self.game.get_observation()
                return Step([{"role": "user", "content": _render(observation) or "(no change)"}])
            rewards, game_info = self.game.close()
        reward = float((rewards or {}).get(PLAYER, 0.0))
        mine = (game_info or {}).get(PLAYER, {})
        info = {"ta_reward": reward, "invalid_move": float(bool(mine.get("invalid_move"))), "turns": float(self.turns),
                "reason": str(mine.get("reason", ""))}
        return Step([], reward=reward, done=True, info=info)


__all__ = ["OFFLINE_GAMES", "TextArenaEnv"]
