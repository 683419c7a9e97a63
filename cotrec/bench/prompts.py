"""Realistic prompts for the LLM benchmarks (and the engine tests): MovieLens-style recommendation asks."""

from __future__ import annotations

import random

from cotrec.llm import letters

MOVIES = ["Toy Story", "GoldenEye", "Four Rooms", "Get Shorty", "Copycat", "Twelve Monkeys", "Babe",
          "Dead Man Walking", "Richard III", "Seven", "The Usual Suspects", "Mighty Aphrodite",
          "Postino, Il", "Braveheart", "Taxi Driver", "Apollo 13", "Batman Forever", "Belle de jour",
          "Crimson Tide", "Desperado", "Free Willy 2", "Mad Love", "Nadja", "Net, The", "Strange Days",
          "To Die For", "Star Wars", "Fargo", "Contact", "Scream", "Titanic", "Liar Liar", "Air Force One",
          "The English Patient", "Jerry Maguire", "Return of the Jedi", "Evita", "Independence Day"]


def history(rng: random.Random, n: int = 8) -> list[str]:
    return rng.sample(MOVIES, n)


def preference_conversations(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": "A user watched these movies in order: " + "; ".join(history(rng))
              + ". In two sentences, describe what kind of movies this user enjoys."}] for _ in range(count)]


def ranking_conversations(count: int, candidates: int = 10, seed: int = 2) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        labels = letters(candidates)
        options = "\n".join(f"{label}. {title}" for label, title in zip(labels, rng.sample(MOVIES, candidates)))
        out.append([{"role": "user", "content": "The user recently watched: " + ", ".join(history(rng, 6))
                     + ".\nWhich movie should they watch next?\n" + options
                     + "\nAnswer with the letter of one option only."}])
    return out
