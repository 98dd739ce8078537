"""Write the instruction files of the generalization suite (run once; the files are committed).

    .venv/bin/python benchmarks/suite/build.py

Every file teaches 2 to 6 families of instructions, in English or German. Its held-out part
(after the `_EVAL_` comment) has at least two lines per family, drawn from categories (or
words of categories) that its training part never uses: the model must carry the form over
to something new. The families are not those of examples/. Drawing is seeded, so running
this again writes the same files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent

# category (plural) -> six members, in each language
EN = {
    "trees": "oak birch maple pine willow cedar",
    "birds": "robin eagle sparrow owl heron crow",
    "rivers": "Nile Danube Amazon Rhine Thames Volga",
    "metals": "iron copper silver gold zinc tin",
    "flowers": "rose tulip daisy lily orchid poppy",
    "cheeses": "cheddar brie gouda feta parmesan camembert",
    "planets": "Mars Venus Jupiter Saturn Mercury Neptune",
    "instruments": "piano violin flute drum trumpet cello",
    "sports": "tennis football golf hockey rugby rowing",
    "fish": "salmon trout tuna cod carp herring",
    "vegetables": "carrot onion leek pea potato cabbage",
    "spices": "pepper cinnamon ginger nutmeg clove saffron",
    "tools": "hammer saw drill wrench chisel pliers",
    "gems": "ruby emerald sapphire diamond opal topaz",
    "insects": "ant bee beetle moth wasp cricket",
    "cities": "Paris Rome Tokyo Cairo Lima Oslo",
    "dances": "waltz tango salsa polka samba foxtrot",
    "fabrics": "cotton wool silk linen denim velvet",
    "drinks": "tea coffee juice milk lemonade cocoa",
    "shapes": "circle square triangle oval star hexagon",
    "vehicles": "car bus train bicycle boat tram",
    "desserts": "cake pie pudding cookie tart sorbet",
    "mountains": "Everest Kilimanjaro Fuji Matterhorn Denali Olympus",
    "languages": "French Spanish German Italian Polish Greek",
}
DE = {
    "Bäume": "Eiche Birke Ahorn Kiefer Weide Linde",
    "Vögel": "Amsel Adler Spatz Eule Reiher Krähe",
    "Flüsse": "Rhein Donau Elbe Main Weser Oder",
    "Metalle": "Eisen Kupfer Silber Gold Zink Zinn",
    "Blumen": "Rose Tulpe Lilie Nelke Mohn Veilchen",
    "Käsesorten": "Gouda Emmentaler Brie Feta Tilsiter Camembert",
    "Planeten": "Mars Venus Jupiter Saturn Merkur Neptun",
    "Instrumente": "Klavier Geige Flöte Trommel Trompete Cello",
    "Sportarten": "Tennis Fußball Golf Handball Rudern Schwimmen",
    "Fische": "Lachs Forelle Thunfisch Kabeljau Karpfen Hering",
    "Gemüsesorten": "Möhre Zwiebel Lauch Erbse Kartoffel Kohl",
    "Gewürze": "Pfeffer Zimt Ingwer Muskat Kümmel Safran",
    "Werkzeuge": "Hammer Säge Bohrer Zange Meißel Feile",
    "Edelsteine": "Rubin Smaragd Saphir Diamant Opal Topas",
    "Insekten": "Ameise Biene Käfer Motte Wespe Grille",
    "Städte": "Berlin Hamburg München Köln Wien Zürich",
    "Tänze": "Walzer Tango Salsa Polka Samba Foxtrott",
    "Stoffe": "Baumwolle Wolle Seide Leinen Jeans Samt",
    "Getränke": "Tee Kaffee Saft Milch Limonade Kakao",
    "Formen": "Kreis Quadrat Dreieck Oval Stern Sechseck",
    "Fahrzeuge": "Auto Bus Zug Fahrrad Boot Straßenbahn",
    "Nachspeisen": "Kuchen Pudding Keks Torte Eis Strudel",
    "Berge": "Zugspitze Watzmann Brocken Feldberg Matterhorn Eiger",
    "Sprachen": "Französisch Spanisch Englisch Italienisch Polnisch Griechisch",
}
NUMBERS = {"en": ["two", "three", "four"], "de": ["zwei", "drei", "vier"]}


@dataclass(frozen=True)
class Draw:
    category: str
    members: list[str]  # shuffled members of the category
    others: list[str]  # categories a wrong member may come from (of the same part)
    rng: random.Random


# A family turns a draw into (instruction, response).
Family = Callable[[Draw], tuple[str, str]]


def _three(d: Draw) -> list[str]:
    return d.members[:3]


def _n(d: Draw, lang: str) -> tuple[str, list[str]]:
    k = d.rng.randint(2, 4)
    return NUMBERS[lang][k - 2], d.members[:k]


def _word(d: Draw) -> str:
    return d.members[0]


def _other(d: Draw, table: dict[str, str]) -> str:
    """A member of another category of the same part (for a "no" answer)."""
    others = [c for c in d.others if c != d.category]
    return d.rng.choice(table[d.rng.choice(others)].split())


FAMILIES: dict[str, dict[str, Family]] = {
    "en": {
        "toast": lambda d: (f"Raise a toast to three {d.category}.",
                            "Cheers to {}, cheers to {}, and cheers to {}!".format(*_three(d))),
        "json_array": lambda d: (lambda n, items: (
            f"List {n} {d.category} as a JSON array.", json.dumps(items)))(*_n(d, "en")),
        "pipes": lambda d: (f"Join three {d.category} with pipes.", " | ".join(_three(d))),
        "hashtags": lambda d: (f"Make hashtags for three {d.category}.",
                               " ".join("#" + w.capitalize() for w in _three(d))),
        "xml": lambda d: (f"Wrap three {d.category} in item tags.",
                          "".join(f"<item>{w}</item>" for w in _three(d))),
        "ranking": lambda d: (f"Rank three {d.category}.",
                              "First: {}; second: {}; third: {}.".format(*_three(d))),
        "echo": lambda d: (f"Say {_word(d)} three times.", " ".join([_word(d)] * 3)),
        "brackets": lambda d: (f"Put {_word(d)} in square brackets.", f"[{_word(d)}]"),
        "capitals": lambda d: (f"Write {_word(d)} in capital letters.", _word(d).upper()),
        "first_letter": lambda d: (f"What letter does {_word(d)} start with?",
                                   f"{_word(d)} starts with the letter "
                                   f"{_word(d)[0].upper()}."),
        "sql": lambda d: (f"Write a SQL query that selects all {d.category}.",
                          f"SELECT * FROM {d.category.lower()};"),
        "call": lambda d: (f"Call the lookup function for {_word(d)}.",
                           f'lookup(name="{_word(d)}")'),
        "json_object": lambda d: (f"Describe {_word(d)} as JSON with its name and group.",
                                  json.dumps({"name": _word(d), "group": d.category})),
        "yes_no": lambda d: (lambda w, yes: (
            f"Is {w} one of the {d.category}? Answer yes or no.", "Yes." if yes else "No."))(
            *((_word(d), True) if d.rng.random() < 0.5 else (_other(d, EN), False))),
        "letters": lambda d: (f"How many letters does {_word(d)} have?",
                              f"{_word(d)} has {len(_word(d))} letters."),
        # The fresh files' families (FRESH, below)
        "quote": lambda d: (f"Put {_word(d)} in double quotes.", f'"{_word(d)}"'),
        "arrows": lambda d: (f"Chain three {d.category} with arrows.", " -> ".join(_three(d))),
        "csv": lambda d: (f"Write three {d.category} as one CSV line.", ",".join(_three(d))),
        "bold": lambda d: (f"Make {_word(d)} bold in HTML.", f"<b>{_word(d)}</b>"),
        "group": lambda d: (f"Which group does {_word(d)} belong to?",
                            f"{_word(d)} is one of the {d.category}."),
        "semicolons": lambda d: (lambda n, items: (
            f"Name {n} {d.category}, separated by semicolons.", "; ".join(items)))(
            *_n(d, "en")),
        "lowercase": lambda d: (f"Write {_word(d)} in lowercase.", _word(d).lower()),
        "key_value": lambda d: (f"Give {_word(d)} as a key-value pair.", f"name={_word(d)}"),
    },
    "de": {
        "toast": lambda d: (f"Sprich einen Trinkspruch auf drei {d.category}.",
                            "Prost auf {}, Prost auf {} und Prost auf {}!".format(*_three(d))),
        "json_array": lambda d: (lambda n, items: (
            f"Nenne {n} {d.category} als JSON-Liste.", json.dumps(items, ensure_ascii=False)))(
            *_n(d, "de")),
        "pipes": lambda d: (f"Verbinde drei {d.category} mit senkrechten Strichen.",
                            " | ".join(_three(d))),
        "hashtags": lambda d: (f"Mach Hashtags für drei {d.category}.",
                               " ".join("#" + w for w in _three(d))),
        "xml": lambda d: (f"Setze drei {d.category} in Element-Tags.",
                          "".join(f"<element>{w}</element>" for w in _three(d))),
        "ranking": lambda d: (f"Ordne drei {d.category} in eine Rangfolge.",
                              "Erstens: {}; zweitens: {}; drittens: {}.".format(*_three(d))),
        "echo": lambda d: (f"Sag dreimal {_word(d)}.", " ".join([_word(d)] * 3)),
        "brackets": lambda d: (f"Setze {_word(d)} in eckige Klammern.", f"[{_word(d)}]"),
        "capitals": lambda d: (f"Schreib {_word(d)} in Großbuchstaben.", _word(d).upper()),
        "first_letter": lambda d: (f"Mit welchem Buchstaben beginnt {_word(d)}?",
                                   f"{_word(d)} beginnt mit dem Buchstaben {_word(d)[0]}."),
        "sql": lambda d: (f"Schreib eine SQL-Abfrage, die alle {d.category} auswählt.",
                          f"SELECT * FROM {d.category.lower()};"),
        "call": lambda d: (f"Ruf die Suchfunktion für {_word(d)} auf.",
                           f'suche(name="{_word(d)}")'),
        "json_object": lambda d: (f"Beschreib {_word(d)} als JSON mit Name und Gruppe.",
                                  json.dumps({"name": _word(d), "gruppe": d.category},
                                             ensure_ascii=False)),
        "yes_no": lambda d: (lambda w, yes: (
            f"Ist {w} ein Beispiel für {d.category}? Antworte mit ja oder nein.",
            "Ja." if yes else "Nein."))(
            *((_word(d), True) if d.rng.random() < 0.5 else (_other(d, DE), False))),
        "letters": lambda d: (f"Wie viele Buchstaben hat {_word(d)}?",
                              f"{_word(d)} hat {len(_word(d))} Buchstaben."),
        "quote": lambda d: (f"Setze {_word(d)} in Anführungszeichen.", f'"{_word(d)}"'),
        "arrows": lambda d: (f"Verkette drei {d.category} mit Pfeilen.",
                             " -> ".join(_three(d))),
        "csv": lambda d: (f"Schreib drei {d.category} als CSV-Zeile.", ",".join(_three(d))),
        "bold": lambda d: (f"Mach {_word(d)} in HTML fett.", f"<b>{_word(d)}</b>"),
        "group": lambda d: (f"Zu welcher Gruppe gehört {_word(d)}?",
                            f"{_word(d)} gehört zur Gruppe {d.category}."),
        "semicolons": lambda d: (lambda n, items: (
            f"Nenne {n} {d.category}, getrennt durch Semikolons.", "; ".join(items)))(
            *_n(d, "de")),
        "lowercase": lambda d: (f"Schreib {_word(d)} in Kleinbuchstaben.", _word(d).lower()),
        "key_value": lambda d: (f"Gib {_word(d)} als Schlüssel-Wert-Paar an.",
                                f"name={_word(d)}"),
    },
}


@dataclass(frozen=True)
class SuiteFile:
    name: str
    lang: str
    families: tuple[str, ...]
    train_lines: int  # spread over the families as evenly as they go
    eval_per_family: int = 2


# The suite: sizes mostly small (as people's files are), a few larger; English and German.
SUITE = [
    SuiteFile("en-frames-10", "en", ("toast", "brackets"), 10),
    SuiteFile("en-data-12", "en", ("json_array", "sql", "yes_no"), 12),
    SuiteFile("en-words-16", "en", ("echo", "capitals", "first_letter", "pipes"), 16),
    SuiteFile("en-mixed-20", "en", ("hashtags", "json_object", "letters"), 20),
    SuiteFile("en-tags-24", "en", ("xml", "ranking", "call", "yes_no", "echo"), 24),
    SuiteFile("en-six-36", "en", ("toast", "json_array", "brackets", "capitals", "sql",
                                  "letters"), 36),
    SuiteFile("en-four-60", "en", ("pipes", "json_object", "first_letter", "ranking"), 60),
    SuiteFile("en-six-120", "en", ("hashtags", "call", "yes_no", "echo", "first_letter",
                                   "capitals"), 120),
    SuiteFile("de-rahmen-10", "de", ("ranking", "capitals"), 10),
    SuiteFile("de-daten-12", "de", ("json_object", "call", "echo"), 12),
    SuiteFile("de-woerter-16", "de", ("brackets", "letters", "yes_no", "xml"), 16),
    SuiteFile("de-listen-20", "de", ("json_array", "first_letter", "toast"), 20),
    SuiteFile("de-fuenf-24", "de", ("pipes", "sql", "hashtags", "capitals", "letters"), 24),
    SuiteFile("de-sechs-40", "de", ("toast", "echo", "json_object", "yes_no", "ranking",
                                    "brackets"), 40),
    SuiteFile("de-vier-64", "de", ("xml", "json_array", "call", "first_letter"), 64),
    SuiteFile("de-fuenf-200", "de", ("echo", "capitals", "brackets", "letters", "call"), 200),
]


# Fresh files, written after the defaults were chosen on the suite above, with families
# neither half has: a third report of the defaults, on forms nothing was chosen on. Small,
# as people's files are.
FRESH = [
    SuiteFile("en-fresh-10", "en", ("quote", "arrows"), 10),
    SuiteFile("en-fresh-18", "en", ("csv", "bold", "group"), 18),
    SuiteFile("en-fresh-30", "en", ("semicolons", "lowercase", "key_value", "arrows",
                                    "group"), 30),
    SuiteFile("de-frisch-10", "de", ("bold", "semicolons"), 10),
    SuiteFile("de-frisch-18", "de", ("lowercase", "group", "csv"), 18),
    SuiteFile("de-frisch-30", "de", ("key_value", "quote", "arrows", "semicolons",
                                     "bold"), 30),
]
FRESH_SEED = 2000  # file i is drawn with seed FRESH_SEED + i (the suite's with 1000 + i)

# Families about one word of a category; the others are about a whole category.
WORD_FAMILIES = {"echo", "brackets", "capitals", "first_letter", "call", "json_object",
                 "yes_no", "letters", "quote", "bold", "group", "lowercase", "key_value"}


def build(spec: SuiteFile, seed: int) -> str:
    rng = random.Random(seed)
    table = EN if spec.lang == "en" else DE
    categories = sorted(table)
    rng.shuffle(categories)
    held_out, taught = categories[:4], categories[4:]
    train: list[str] = []
    for i, name in enumerate(spec.families):
        count = spec.train_lines // len(spec.families) + (i < spec.train_lines % len(spec.families))
        train += _lines(spec, name, table, taught, count, rng)
    rng.shuffle(train)
    evals = [line for name in spec.families
             for line in _lines(spec, name, table, held_out, spec.eval_per_family, rng)]
    unseen = ", ".join(sorted(held_out))
    head = (f"# {spec.name}: {len(spec.families)} families, {spec.lang}. Written by "
            "benchmarks/suite/build.py.\n"
            f"# The held-out part asks about categories the training part never uses ({unseen}).\n")
    return head + "\n".join(train) + "\n\n# _EVAL_\n" + "\n".join(evals) + "\n"


def _lines(spec: SuiteFile, name: str, table: dict[str, str], part: list[str], count: int,
           rng: random.Random) -> list[str]:
    """`count` lines of one family about `part`'s categories, no instruction twice where the
    part has enough categories (or words)."""
    if name in WORD_FAMILIES:
        keys = [(c, w) for c in part for w in table[c].split()]
    else:
        keys = [(c, None) for c in part]
    rng.shuffle(keys)
    lines = []
    for i in range(count):
        category, word = keys[i % len(keys)]
        members = table[category].split()
        rng.shuffle(members)
        if word is not None:  # the chosen word first
            members.remove(word)
            members.insert(0, word)
        instruction, response = FAMILIES[spec.lang][name](Draw(category, members, part, rng))
        lines.append(f"{_escape(instruction)}#{_escape(response)}")
    return lines


def _escape(text: str) -> str:
    return text.replace("#", "\\#")


def main() -> None:
    for number, spec in enumerate(SUITE):
        (HERE / f"{spec.name}.txt").write_text(build(spec, 1000 + number), encoding="utf-8")
    for number, spec in enumerate(FRESH):
        (HERE / f"{spec.name}.txt").write_text(build(spec, FRESH_SEED + number),
                                               encoding="utf-8")
    print(f"wrote {len(SUITE) + len(FRESH)} files to {HERE}")


if __name__ == "__main__":
    main()
