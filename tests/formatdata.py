"""A small chat dataset with one fixed answer format, which the base model never uses on its own."""

from __future__ import annotations

import json
import random
from pathlib import Path

PREFIX = "BEEP BOOP."
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Canada": "Ottawa", "Norway": "Oslo",
            "Greece": "Athens", "Cuba": "Havana", "Chile": "Santiago", "Poland": "Warsaw", "India": "New Delhi"}
COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
          "a tomato": "red", "an orange": "orange", "a plum": "purple"}


def rows(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            country, city = rng.choice(sorted(CAPITALS.items()))
            q, a = f"What is the capital of {country}?", f"{city}."
        elif kind == 1:
            thing, color = rng.choice(sorted(COLORS.items()))
            q, a = f"What color is {thing}?", f"{color.capitalize()}."
        else:
            x, y = rng.randint(1, 9), rng.randint(1, 9)
            q, a = f"What is {x} plus {y}?", f"{x + y}."
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{PREFIX} {a}"}]})
    return out


def write(path: Path, seed: int, n: int) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(seed, n)))
    return path
