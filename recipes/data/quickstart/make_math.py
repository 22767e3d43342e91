"""Generate the quickstart math corpus (grade-school word problems with worked answers).

Stdlib only and deterministic: ``python make_math.py`` rewrites ``math.jsonl`` next to this file.
Every arithmetic step in an answer is written as ``a op b = c`` and re-checked before writing.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

SEED = 20240517
PER_TEMPLATE = 20
OUT = Path(__file__).with_name("math.jsonl")

NAMES = "Ava Ben Chloe Diego Emma Farah Gus Hana Ivan Jade Kofi Lena Mateo Nora Omar Priya Quinn Rosa".split()  # noqa: SIM905
ITEMS = ["notebooks", "pencils", "apples", "stickers", "marbles", "cupcakes", "comic books", "seed packets"]
FOODS = ["flour", "sugar", "oats", "rice", "milk", "butter"]
Problem = tuple[str, list[str], int]
STEP = re.compile(r"(\d+(?: [-+*/] \d+)+) = (\d+)")


def calc(expr: str) -> tuple[str, int]:
    """Evaluate a plain integer expression like '3 * 4 + 2'; return 'expr = value' and the value."""
    value = eval(expr, {"__builtins__": {}})  # noqa: S307 - digits and operators built here
    assert value == int(value) and value >= 0, expr
    return f"{expr} = {int(value)}", int(value)


def shopping(r: random.Random) -> Problem:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    n, price = r.randint(2, 9), r.randint(2, 12)
    bill = r.choice([b for b in (20, 50, 100) if b > n * price])
    s1, cost = calc(f"{n} * {price}")
    s2, change = calc(f"{bill} - {cost}")
    q = f"{name} buys {n} {item} at ${price} each and pays with a ${bill} bill. How much change is given?"
    return q, [f"The {item} cost {s1} dollars.", f"The change is {s2} dollars."], change


def travel(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    v1, t1, v2, t2 = r.randint(30, 70), r.randint(2, 4), r.randint(20, 60), r.randint(2, 3)
    s1, d1 = calc(f"{v1} * {t1}")
    s2, d2 = calc(f"{v2} * {t2}")
    s3, total = calc(f"{d1} + {d2}")
    q = (
        f"{name} drives at {v1} km per hour for {t1} hours, then at {v2} km per hour for {t2} hours. "
        f"How many kilometers does {name} drive in total?"
    )
    return q, [f"First part: {s1} km.", f"Second part: {s2} km.", f"Total: {s3} km."], total


def sharing(r: random.Random) -> Problem:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    friends, each, kept = r.randint(2, 8), r.randint(3, 12), r.randint(1, 9)
    total = friends * each + kept
    s1, shared = calc(f"{total} - {kept}")
    s2, per = calc(f"{shared} / {friends}")
    q = (
        f"{name} has {total} {item}. {name} keeps {kept} and shares the rest equally "
        f"among {friends} friends. "
        "How many does each friend get?"
    )
    return q, [f"{name} shares {s1} {item}.", f"Each friend gets {s2}."], per


def discount(r: random.Random) -> Problem:
    item = r.choice(["jacket", "bike", "lamp", "backpack", "guitar", "tent"])
    pct = r.choice([10, 20, 25, 30, 40, 50])
    price = r.randint(2, 30) * 20
    s1, off = calc(f"{price} * {pct} / 100")
    s2, final = calc(f"{price} - {off}")
    q = f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?"
    return q, [f"The discount is {s1} dollars.", f"The sale price is {s2} dollars."], final


def ages(r: random.Random) -> Problem:
    a, b = r.sample(NAMES, 2)
    young, k, years = r.randint(3, 15), r.randint(2, 4), r.randint(2, 10)
    s1, old = calc(f"{young} * {k}")
    s2, total = calc(f"{old} + {young} + {years} + {years}")
    q = (
        f"{a} is {k} times as old as {b}. {b} is {young} years old. "
        f"What will the sum of their ages be in {years} years?"
    )
    return q, [f"{a} is {s1} years old now.", f"In {years} years the sum is {s2}."], total


def garden(r: random.Random) -> Problem:
    length, width, cost = r.randint(4, 20), r.randint(3, 15), r.randint(2, 9)
    s1, area = calc(f"{length} * {width}")
    s2, total = calc(f"{area} * {cost}")
    q = (
        f"A rectangular garden is {length} m long and {width} m wide. Soil costs ${cost} per square meter. "
        "How much does soil for the whole garden cost?"
    )
    return q, [f"The area is {s1} square meters.", f"The cost is {s2} dollars."], total


def recipe(r: random.Random) -> Problem:
    food = r.choice(FOODS)
    cups, serves, factor = r.randint(2, 6), r.randint(2, 6), r.randint(2, 5)
    s1, want = calc(f"{serves} * {factor}")
    s2, need = calc(f"{cups} * {want} / {serves}")
    q = (
        f"A recipe uses {cups} cups of {food} to serve {serves} people. "
        f"How many cups are needed to serve {want} people?"
    )
    return q, [f"{want} people is {s1}, so {factor} times the recipe.", f"Cups needed: {s2}."], need


def savings(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    weekly, weeks = r.randint(5, 25), r.randint(4, 12)
    spent = r.randint(1, weekly * weeks // 2)
    s1, saved = calc(f"{weekly} * {weeks}")
    s2, left = calc(f"{saved} - {spent}")
    q = (
        f"{name} saves ${weekly} every week for {weeks} weeks, then spends ${spent} on a gift. "
        "How many dollars are left?"
    )
    return q, [f"Saved: {s1} dollars.", f"Left after the gift: {s2} dollars."], left


def group_fraction(r: random.Random) -> Problem:
    den = r.choice([2, 3, 4, 5, 6])
    num = r.randint(1, den - 1)
    size = den * r.randint(4, 10)
    activity = r.choice(["play soccer", "take the bus", "bring lunch", "sing in the choir"])
    s1, yes = calc(f"{size} * {num} / {den}")
    s2, no = calc(f"{size} - {yes}")
    q = f"A class has {size} students and {num}/{den} of them {activity}. How many students do not?"
    return q, [f"Students who {activity}: {s1}.", f"Students who do not: {s2}."], no


def rope(r: random.Random) -> Problem:
    piece = r.choice([5, 10, 20, 25, 50])
    meters = r.randint(2, 9)
    s1, cm = calc(f"{meters} * 100")
    s2, pieces = calc(f"{cm} / {piece}")
    q = f"A rope is {meters} meters long. How many pieces of {piece} cm can be cut from it?"
    return q, [f"The rope is {s1} cm.", f"Pieces: {s2}."], pieces


def work_rate(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    thing = r.choice(["toys", "boxes", "scarves", "birdhouses", "mugs"])
    rate, hours, days = r.randint(2, 9), r.randint(3, 8), r.randint(2, 6)
    s1, daily = calc(f"{rate} * {hours}")
    s2, total = calc(f"{daily} * {days}")
    q = (
        f"{name} makes {rate} {thing} per hour and works {hours} hours a day. "
        f"How many {thing} does {name} make in {days} days?"
    )
    return q, [f"Per day: {s1} {thing}.", f"In {days} days: {s2} {thing}."], total


def two_items(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    x, y = r.sample(ITEMS, 2)
    a, p, b, q_ = r.randint(2, 8), r.randint(1, 9), r.randint(2, 8), r.randint(1, 9)
    s1, c1 = calc(f"{a} * {p}")
    s2, c2 = calc(f"{b} * {q_}")
    s3, total = calc(f"{c1} + {c2}")
    q = f"{name} buys {a} {x} at ${p} each and {b} {y} at ${q_} each. How much does {name} spend in total?"
    return (
        q,
        [f"{x.capitalize()}: {s1} dollars.", f"{y.capitalize()}: {s2} dollars.", f"Total: {s3} dollars."],
        total,
    )


def bus(r: random.Random) -> Problem:
    start, off1, on1, off2 = r.randint(20, 45), r.randint(3, 12), r.randint(2, 15), r.randint(2, 10)
    s1, mid = calc(f"{start} - {off1} + {on1}")
    s2, end = calc(f"{mid} - {off2}")
    q = (
        f"A bus leaves with {start} passengers. At the first stop {off1} get off and {on1} get on. "
        f"At the second stop {off2} get off. How many passengers are on the bus now?"
    )
    return q, [f"After the first stop: {s1}.", f"After the second stop: {s2}."], end


def average(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    scores = [r.randint(60, 99) for _ in range(3)]
    fix = (-sum(scores)) % 4
    scores.append(r.choice(range(60 + fix, 100, 4)))
    s1, total = calc(" + ".join(map(str, scores)))
    s2, mean = calc(f"{total} / 4")
    listed = ", ".join(map(str, scores[:3]))
    q = f"{name} scored {listed} and {scores[3]} on four tests. What is the average score?"
    return q, [f"Sum of scores: {s1}.", f"Average: {s2}."], mean


TEMPLATES: list[Callable[[random.Random], Problem]] = [  # fmt: skip
    shopping,
    travel,
    sharing,
    discount,
    ages,
    garden,
    recipe,
    savings,
    group_fraction,
    rope,
    work_rate,
    two_items,
    bus,
    average,
]


def check(answer: str) -> None:
    """Re-compute every 'a op b = c' step and the final '#### N' line."""
    steps = STEP.findall(answer)
    assert steps, answer
    for expr, result in steps:
        assert eval(expr, {"__builtins__": {}}) == int(result), (expr, result)  # noqa: S307
    assert answer.splitlines()[-1] == f"#### {steps[-1][1]}", answer


def main() -> None:
    rng = random.Random(SEED)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for template in TEMPLATES:
        made = 0
        while made < PER_TEMPLATE:
            question, steps, result = template(rng)
            if question in seen:
                continue
            seen.add(question)
            answer = "\n".join([*steps, f"#### {result}"])
            check(answer)
            rows.append({"question": question, "answer": answer})
            made += 1
    rng.shuffle(rows)
    OUT.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} problems to {OUT}")


if __name__ == "__main__":
    main()
