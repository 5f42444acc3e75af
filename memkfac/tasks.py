"""Seeded generators for the offline downstream suite: multiple-choice items scored by log-likelihood.

Each generator returns ``n`` items ``{"query": str, "choices": list[str], "gold": int, ...}``; lm-eval
scores ``query + " " + choice`` for every choice and counts an item correct when the gold choice has the
highest log-likelihood. The categories follow the paper's downstream spectrum (section 6): closed-book
facts in frequency tiers, open-book facts, arithmetic (SimpleMath), BBH-style boolean expressions,
tracking shuffled objects and logical deduction, and in-context copying.

The gold position is drawn uniformly per item, so a model that always picks one position scores chance.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

from memkfac.errors import MemkfacError

Item = dict

# Closed-book facts: (country, capital, main language, currency). Countries with one clear main
# language and one capital, so every distractor is wrong. "common": large, often-written-about
# countries; "rare": small or seldom-mentioned ones. The tier is a proxy for how often the fact
# appears in pretraining text, as the paper uses relation prevalence (section 6.2, Fig. 5).
COUNTRY_FACTS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "common": (
        ("France", "Paris", "French", "euro"),
        ("Germany", "Berlin", "German", "euro"),
        ("Italy", "Rome", "Italian", "euro"),
        ("Spain", "Madrid", "Spanish", "euro"),
        ("Portugal", "Lisbon", "Portuguese", "euro"),
        ("Greece", "Athens", "Greek", "euro"),
        ("the Netherlands", "Amsterdam", "Dutch", "euro"),
        ("Austria", "Vienna", "German", "euro"),
        ("Poland", "Warsaw", "Polish", "zloty"),
        ("Sweden", "Stockholm", "Swedish", "krona"),
        ("Norway", "Oslo", "Norwegian", "krone"),
        ("Denmark", "Copenhagen", "Danish", "krone"),
        ("Finland", "Helsinki", "Finnish", "euro"),
        ("Russia", "Moscow", "Russian", "ruble"),
        ("Ukraine", "Kyiv", "Ukrainian", "hryvnia"),
        ("Hungary", "Budapest", "Hungarian", "forint"),
        ("the Czech Republic", "Prague", "Czech", "koruna"),
        ("Turkey", "Ankara", "Turkish", "lira"),
        ("Egypt", "Cairo", "Arabic", "pound"),
        ("Saudi Arabia", "Riyadh", "Arabic", "riyal"),
        ("Iran", "Tehran", "Persian", "rial"),
        ("Japan", "Tokyo", "Japanese", "yen"),
        ("China", "Beijing", "Chinese", "yuan"),
        ("South Korea", "Seoul", "Korean", "won"),
        ("India", "New Delhi", "Hindi", "rupee"),
        ("Pakistan", "Islamabad", "Urdu", "rupee"),
        ("Thailand", "Bangkok", "Thai", "baht"),
        ("Vietnam", "Hanoi", "Vietnamese", "dong"),
        ("Indonesia", "Jakarta", "Indonesian", "rupiah"),
        ("the Philippines", "Manila", "Filipino", "peso"),
        ("the United States", "Washington", "English", "dollar"),
        ("the United Kingdom", "London", "English", "pound"),
        ("Australia", "Canberra", "English", "dollar"),
        ("Mexico", "Mexico City", "Spanish", "peso"),
        ("Brazil", "Brasilia", "Portuguese", "real"),
        ("Argentina", "Buenos Aires", "Spanish", "peso"),
        ("Chile", "Santiago", "Spanish", "peso"),
        ("Peru", "Lima", "Spanish", "sol"),
        ("Colombia", "Bogota", "Spanish", "peso"),
        ("Cuba", "Havana", "Spanish", "peso"),
        ("Kenya", "Nairobi", "Swahili", "shilling"),
        ("Nigeria", "Abuja", "English", "naira"),
    ),
    "rare": (
        ("Bhutan", "Thimphu", "Dzongkha", "ngultrum"),
        ("Eritrea", "Asmara", "Tigrinya", "nakfa"),
        ("Kyrgyzstan", "Bishkek", "Kyrgyz", "som"),
        ("Tajikistan", "Dushanbe", "Tajik", "somoni"),
        ("Turkmenistan", "Ashgabat", "Turkmen", "manat"),
        ("Azerbaijan", "Baku", "Azerbaijani", "manat"),
        ("Moldova", "Chisinau", "Romanian", "leu"),
        ("Laos", "Vientiane", "Lao", "kip"),
        ("Mongolia", "Ulaanbaatar", "Mongolian", "tugrik"),
        ("Myanmar", "Naypyidaw", "Burmese", "kyat"),
        ("Cambodia", "Phnom Penh", "Khmer", "riel"),
        ("Nepal", "Kathmandu", "Nepali", "rupee"),
        ("Madagascar", "Antananarivo", "Malagasy", "ariary"),
        ("Mauritania", "Nouakchott", "Arabic", "ouguiya"),
        ("Burkina Faso", "Ouagadougou", "French", "franc"),
        ("Gabon", "Libreville", "French", "franc"),
        ("Benin", "Porto-Novo", "French", "franc"),
        ("Lesotho", "Maseru", "Sesotho", "loti"),
        ("Zambia", "Lusaka", "English", "kwacha"),
        ("Suriname", "Paramaribo", "Dutch", "dollar"),
        ("Guyana", "Georgetown", "English", "dollar"),
        ("Belize", "Belmopan", "English", "dollar"),
        ("Honduras", "Tegucigalpa", "Spanish", "lempira"),
        ("Nicaragua", "Managua", "Spanish", "cordoba"),
        ("Uruguay", "Montevideo", "Spanish", "peso"),
        ("Latvia", "Riga", "Latvian", "euro"),
        ("Lithuania", "Vilnius", "Lithuanian", "euro"),
        ("Estonia", "Tallinn", "Estonian", "euro"),
        ("Slovenia", "Ljubljana", "Slovene", "euro"),
        ("Slovakia", "Bratislava", "Slovak", "euro"),
        ("Albania", "Tirana", "Albanian", "lek"),
        ("North Macedonia", "Skopje", "Macedonian", "denar"),
        ("Georgia", "Tbilisi", "Georgian", "lari"),
        ("Armenia", "Yerevan", "Armenian", "dram"),
        ("Vanuatu", "Port Vila", "Bislama", "vatu"),
        ("Tonga", "Nuku'alofa", "Tongan", "pa'anga"),
        ("Samoa", "Apia", "Samoan", "tala"),
        ("Botswana", "Gaborone", "Setswana", "pula"),
        ("Malawi", "Lilongwe", "Chichewa", "kwacha"),
        ("Djibouti", "Djibouti City", "Somali", "franc"),
    ),
}

# (relation field index, prompt templates); the answer follows the prompt after one space.
_FACT_TEMPLATES: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            "The capital of {c} is",
            "Q: What is the capital city of {c}?\nA:",
            "The capital city of {c} is called",
        ),
    ),
    (
        2,
        (
            "The official language of {c} is",
            "Q: What language do people in {c} speak?\nA:",
            "In {c}, most people speak",
        ),
    ),
    (
        3,
        (
            "The currency of {c} is the",
            "Q: What is the currency of {c}?\nA: The",
            "In {c}, people pay with the",
        ),
    ),
)

_NAME_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ren",
    "tor",
    "va",
    "zel",
    "bru",
    "dan",
    "fi",
    "gor",
    "hal",
    "nis",
    "pe",
    "sul",
    "tam",
)
_OPEN_BOOK_RELATIONS = (
    ("{e} is the capital of {x}.", "What is the capital of {x}?", "city"),
    ("{x} was founded by {e}.", "Who founded {x}?", "person"),
    ("The river {e} flows through {x}.", "Which river flows through {x}?", "river"),
)
_PEOPLE = ("Alice", "Bob", "Claire", "Dave", "Eve", "Fred", "Gina", "Hank", "Iris", "Jack")
_COLORS = ("red", "blue", "green", "yellow", "purple", "gray", "white", "black", "pink", "brown")
_OBJECTS = ("book", "ball", "box", "cup", "hat", "vase", "lamp", "bird")
_COPY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def _mc(rng: random.Random, query: str, gold: str, distractors: list[str], **extra) -> Item:
    """Put the gold answer at a uniformly drawn position among the distractors."""
    choices = list(distractors)
    pos = rng.randrange(len(choices) + 1)
    choices.insert(pos, gold)
    return {"query": query, "choices": choices, "gold": pos, **extra}


def closed_book_facts(rng: random.Random, n: int, tier: str) -> list[Item]:
    """Country capital / language / currency questions in one frequency tier; 4 choices.

    Distractors are other values of the same relation in the same tier. Items are distinct
    (country, relation, template) triples, so ``n`` is limited to 3 * 3 * countries in the tier.
    """
    facts = COUNTRY_FACTS[tier]
    pool = [(f, field, t) for f in facts for field, templates in _FACT_TEMPLATES for t in templates]
    if n > len(pool):
        raise MemkfacError(
            f"closed-book tier {tier!r} has {len(pool)} distinct items; {n} requested",
            f"ask for at most {len(pool)} items for this task",
        )
    items = []
    for fact, field, template in rng.sample(pool, n):
        values = sorted({f[field] for f in facts} - {fact[field]})
        items.append(_mc(rng, template.format(c=fact[0]), fact[field], rng.sample(values, 3), tier=tier))
    return items


def _fictional_name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_NAME_SYLLABLES) for _ in range(syllables)).capitalize()


def open_book_facts(rng: random.Random, n: int) -> list[Item]:
    """Three facts about fictional entities stated in the context, then a question about one; 4 choices.

    The three stated answers plus one unseen name are the choices, so the model must read which fact
    the question is about; memorized knowledge cannot help (all names are invented).
    """
    items = []
    for _ in range(n):
        fact, question, _kind = rng.choice(_OPEN_BOOK_RELATIONS)
        names = set()
        while len(names) < 7:
            names.add(_fictional_name(rng, rng.choice((2, 3))))
        names = sorted(names)
        rng.shuffle(names)
        places, answers = names[:3], names[3:]
        context = " ".join(fact.format(e=a, x=p) for a, p in zip(answers[:3], places, strict=True))
        k = rng.randrange(3)
        query = f"{context}\nQuestion: {question.format(x=places[k])}\nAnswer:"
        items.append(_mc(rng, query, answers[k], [a for i, a in enumerate(answers) if i != k]))
    return items


def _arithmetic_problem(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"{a} + {b} =", a + b
    a, b = max(a, b), min(a, b)
    return f"{a} - {b} =", a - b


def arithmetic(rng: random.Random, n: int, shots: int = 5) -> list[Item]:
    """Two-digit addition and subtraction (the paper's SimpleMath) after ``shots`` solved examples; 4 choices.

    Distractors are the nearest plausible slips: off by one, off by ten and off by eleven.
    """
    items = []
    for _ in range(n):
        demos = [_arithmetic_problem(rng) for _ in range(shots)]
        question, answer = _arithmetic_problem(rng)
        slips = sorted({answer + d for d in (-11, -10, -1, 1, 10, 11)} - {answer})
        slips = [s for s in slips if s >= 0]
        query = "".join(f"{q} {a}\n" for q, a in demos) + question
        items.append(_mc(rng, query, str(answer), [str(s) for s in rng.sample(slips, 3)]))
    return items


def _boolean_expression(rng: random.Random, depth: int) -> tuple[str, bool]:
    if depth == 0 or rng.random() < 0.3:
        value = rng.random() < 0.5
        return str(value), value
    kind = rng.choice(("not", "and", "or"))
    if kind == "not":
        text, value = _boolean_expression(rng, depth - 1)
        return f"not {text}", not value
    (lt, lv), (rt, rv) = _boolean_expression(rng, depth - 1), _boolean_expression(rng, depth - 1)
    return f"( {lt} {kind} {rt} )", (lv and rv) if kind == "and" else (lv or rv)


def boolean_expressions(rng: random.Random, n: int) -> list[Item]:
    """Distinct BBH-style boolean expressions of nesting depth <= 3; choices True / False, half of each."""
    items, seen = [], {"True", "False"}
    for i in range(n):
        want = i % 2 == 0  # balance the labels so chance is exactly 50%
        while True:
            text, value = _boolean_expression(rng, 3)
            if value == want and text not in seen:
                break
        seen.add(text)
        query = f"Evaluate the Boolean expression.\nQ: {text} is\nA:"
        items.append({"query": query, "choices": ["True", "False"], "gold": 0 if value else 1})
    rng.shuffle(items)
    return items


def tracking_shuffled_objects(rng: random.Random, n: int, swaps: int = 3) -> list[Item]:
    """BBH tracking_shuffled_objects, three people: who holds which ball after ``swaps`` trades; 3 choices."""
    items = []
    for _ in range(n):
        people = rng.sample(_PEOPLE, 3)
        colors = rng.sample(_COLORS, 3)
        holding = dict(zip(people, colors, strict=True))
        start = ", ".join(f"{p} has a {c} ball" for p, c in holding.items())
        trades = []
        for _ in range(swaps):
            a, b = rng.sample(people, 2)
            holding[a], holding[b] = holding[b], holding[a]
            trades.append(f"{a} and {b} swap balls.")
        asked = rng.choice(people)
        query = (
            f"{people[0]}, {people[1]} and {people[2]} are playing a game. At the start, {start}. "
            f"Then, in order: {' '.join(trades)} At the end of the game, {asked} has the"
        )
        items.append(
            {"query": query, "choices": [f"{c} ball" for c in colors], "gold": colors.index(holding[asked])}
        )
    return items


_POSITIONS = ("leftmost", "second from the left", "rightmost")


def _deduction_clue(
    order: tuple[str, ...], rng: random.Random
) -> tuple[str, Callable[[tuple[str, ...]], bool]]:
    """One true statement about ``order`` (left to right) and the predicate it states."""
    if rng.random() < 0.5:
        k = rng.randrange(3)
        x = order[k]
        return f"The {x} is the {_POSITIONS[k]}.", lambda o, x=x, k=k: o[k] == x
    i, j = sorted(rng.sample(range(3), 2))
    x, y = order[i], order[j]
    if rng.random() < 0.5:
        return f"The {x} is to the left of the {y}.", lambda o, x=x, y=y: o.index(x) < o.index(y)
    return f"The {y} is to the right of the {x}.", lambda o, x=x, y=y: o.index(x) < o.index(y)


def logical_deduction(rng: random.Random, n: int) -> list[Item]:
    """BBH logical_deduction with three objects on a shelf: clues fix the order; ask one position; 3 choices.

    Clues are drawn until exactly one of the 6 orders satisfies them all (checked by enumeration).
    """
    items = []
    for _ in range(n):
        color_names = rng.sample(_COLORS, 3)
        thing = rng.choice(_OBJECTS)
        objects = tuple(f"{c} {thing}" for c in color_names)
        order = tuple(rng.sample(objects, 3))
        clues: list[str] = []
        preds = []
        while sum(all(p(o) for p in preds) for o in itertools.permutations(objects)) != 1:
            text, pred = _deduction_clue(order, rng)
            if text not in clues:
                clues.append(text)
                preds.append(pred)
        k = rng.randrange(3)
        query = (
            f"On a shelf there are three {thing}s: a {objects[0]}, a {objects[1]} and a {objects[2]}. "
            f"{' '.join(clues)}\nQuestion: Which {thing} is the {_POSITIONS[k]}?\nAnswer: The"
        )
        items.append({"query": query, "choices": list(objects), "gold": objects.index(order[k])})
    return items


def copying(rng: random.Random, n: int, length: int = 8) -> list[Item]:
    """Copy a random string shown in the context; 4 choices of equal length (gold and three corruptions)."""
    items = []
    for _ in range(n):
        s = "".join(rng.choice(_COPY_ALPHABET) for _ in range(length))
        corruptions: set[str] = set()
        while len(corruptions) < 3:
            chars = list(s)
            i = rng.randrange(length)
            if rng.random() < 0.5 and i + 1 < length and chars[i] != chars[i + 1]:
                chars[i], chars[i + 1] = chars[i + 1], chars[i]
            else:
                chars[i] = rng.choice(_COPY_ALPHABET.replace(chars[i], ""))
            corruptions.add("".join(chars))
        query = f"Repeat the code exactly.\nCode: {s}\nRepeated:"
        items.append(_mc(rng, query, s, sorted(corruptions)))
    return items


# Task name -> (generator, category, number of choices). Names are the lm-eval task names minus "memkfac_".
GENERATORS: dict[str, tuple[Callable[[random.Random, int], list[Item]], str, int]] = {
    "facts_common": (lambda rng, n: closed_book_facts(rng, n, "common"), "closed-book", 4),
    "facts_rare": (lambda rng, n: closed_book_facts(rng, n, "rare"), "closed-book", 4),
    "open_book": (open_book_facts, "open-book", 4),
    "arithmetic": (arithmetic, "math", 4),
    "boolean_expressions": (boolean_expressions, "logic", 2),
    "tracking_shuffled_objects": (tracking_shuffled_objects, "logic", 3),
    "logical_deduction": (logical_deduction, "logic", 3),
    "copying": (copying, "in-context", 4),
}


def generate_items(task: str, n: int, seed: int) -> list[Item]:
    """The ``n`` items of generated task ``task`` for ``seed``; the same arguments give the same items."""
    if task not in GENERATORS:
        raise MemkfacError(f"unknown generated task {task!r}", f"choose one of {', '.join(GENERATORS)}")
    # The task name is part of the seed so tasks with the same seed do not share random streams.
    return GENERATORS[task][0](random.Random(f"{seed}:{task}"), n)
