"""A seeded synthetic MRQA-format dataset and a tokenizer trained on it: the offline demo's and tests' data.

Each context describes a few people with facts about them (birthplace, birth year, job, employer,
favourite colour, pet); the other people are distractors, so a model must match the name in the question
to the right sentence rather than learn "the answer is the first city". Some contexts describe many people
and need several windows. Names mix ASCII with accented, CJK and other scripts, so offsets are exercised.
Questions come in several phrasings per fact. Answers are spans of the context with inclusive char_spans,
exactly as the MRQA release writes them.
"""
import gzip
import json
import random

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

FIRST = ["Ada", "Bruno", "Chloé", "Dmitri", "Elif", "Farah", "Gustav", "Hana", "Ilse", "Jonas", "Kenji", "Lucía",
         "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Søren", "Tomás", "Ursula", "Vikram", "Wen", "Yusuf",
         "Zoë", "Ángel", "Björn", "Émile", "李娜", "Олег"]
LAST = ["Abebe", "Berg", "Castillo", "Dubois", "Eriksen", "Fischer", "García", "Horvath", "Ivanova", "Jensen",
        "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quispe", "Rossi", "Schmidt", "Tanaka",
        "Ueda", "Varga", "Weber", "Yilmaz", "Zhang", "Müller", "Ñúñez", "王", "Søndergaard", "O'Brien"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Kraków", "Montréal", "Osaka", "Lima", "Tbilisi", "Reykjavík", "Hanoi",
          "Porto Alegre", "Cape Town", "São Paulo", "Zürich", "Kyoto", "Dakar", "Quito", "Tallinn", "Busan", "Perth"]
JOBS = ["carpenter", "nurse", "software engineer", "pilot", "violinist", "chemist", "baker", "architect",
        "journalist", "teacher", "botanist", "firefighter", "lawyer", "painter", "surgeon", "librarian"]
COMPANIES = ["Northwind Labs", "Blue Harbor Shipping", "Kestrel Foods", "Orion Textiles", "Maple & Finch",
             "Helix Robotics", "Granite Bank", "Silverline Rail", "Lumen Optics", "Tidewater Energy"]
COLOURS = ["crimson", "teal", "amber", "violet", "olive", "navy blue", "coral", "indigo", "ochre", "lavender"]
PETS = ["a tortoise named Pico", "two cats", "a parrot called Kiwi", "a border collie", "goldfish", "a ferret"]

# fact -> (sentence templates, question templates); {n} is the person's full name, {v} the answer.
FACTS = {
    "city": (["{n} was born in {v}.", "Born in {v}, {n} moved often as a child."],
             ["Where was {n} born?", "In which city was {n} born?", "What is the birthplace of {n}?"]),
    "year": (["{n} was born in the year {v}.", "The year {v} saw the birth of {n}."],
             ["In which year was {n} born?", "When was {n} born?", "What year was {n} born in?"]),
    "job": (["{n} works as a {v}.", "By profession, {n} is a {v}."],
            ["What does {n} do for a living?", "What is the profession of {n}?", "What job does {n} have?"]),
    "company": (["{n} is employed by {v}.", "For years {n} has worked at {v}."],
                ["Which company employs {n}?", "Where does {n} work?", "Who is the employer of {n}?"]),
    "colour": (["The favourite colour of {n} is {v}.", "{n} likes the colour {v} best."],
               ["What is the favourite colour of {n}?", "Which colour does {n} like best?"]),
    "pet": (["At home, {n} keeps {v}.", "{n} lives with {v}."],
            ["What pet does {n} keep?", "Which animal lives with {n}?"]),
}
FILLER = ["The weather that spring was unusually mild.", "Local newspapers rarely covered such stories.",
          "Nobody remembers exactly how the tradition started.", "Trains between the two towns ran twice a day."]


def _value(rng, fact):
    return {"city": lambda: rng.choice(CITIES), "year": lambda: str(rng.randint(1900, 2015)),
            "job": lambda: rng.choice(JOBS), "company": lambda: rng.choice(COMPANIES),
            "colour": lambda: rng.choice(COLOURS), "pet": lambda: rng.choice(PETS)}[fact]()


def make_context(rng, n_people, qid_prefix, n_questions=3, filler=0.25, facts=(2, 4), shared_facts=1.0):
    """One MRQA context line: several people, facts[0]..facts[1] fact sentences each, questions about them.

    With probability 1 - shared_facts a context gives each fact kind to at most one person while the six
    kinds last, so that its questions can be answered by the kind of answer alone; otherwise (and in long
    contexts, which run out of kinds) several people share a kind and only the name tells them apart."""
    names = set()
    while len(names) < n_people:
        names.add(f"{rng.choice(FIRST)} {rng.choice(LAST)}")
    names = sorted(names)
    rng.shuffle(names)
    sentences = []  # (text, name, fact, value, value's offset in text)
    unused = list(FACTS) if shared_facts < 1.0 and rng.random() >= shared_facts else None
    for name in names:
        k = rng.randint(*facts)
        kinds = rng.sample(unused, k=k) if unused is not None and len(unused) >= k else rng.sample(list(FACTS), k=k)
        if unused is not None:
            unused = [f for f in unused if f not in kinds]
        for fact in kinds:
            value, template = _value(rng, fact), rng.choice(FACTS[fact][0])
            at = len(template[: template.index("{v}")].format(n=name))  # where the value starts in the sentence
            sentences.append((template.format(n=name, v=value), name, fact, value, at))
    rng.shuffle(sentences)
    context, spans = "", []
    for text, name, fact, value, at in sentences:
        if rng.random() < filler:
            context += rng.choice(FILLER) + " "
        spans.append((name, fact, value, len(context) + at))
        context += text + " "
    context = context.strip()
    qas = []
    for k, (name, fact, value, start) in enumerate(rng.sample(spans, k=min(n_questions, len(spans)))):
        assert context[start:start + len(value)] == value
        qas.append({"qid": f"{qid_prefix}-{k}", "question": rng.choice(FACTS[fact][1]).format(n=name),
                    "answers": [value], "detected_answers": [{"text": value, "char_spans": [[start, start + len(value) - 1]],
                                                              "token_spans": []}]})
    return {"id": qid_prefix, "context": context, "qas": qas}


def make_dataset(n_contexts, seed, long_fraction=0.1, split="train", people=(2, 4), long_people=(12, 16),
                 facts=(2, 4), filler=0.25, shared_facts=1.0):
    """n_contexts context lines of people[0]..people[1] people; long_fraction of them describe
    long_people[0]..long_people[1] people instead (long enough for several windows)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_contexts):
        n_people = rng.randint(*long_people) if rng.random() < long_fraction else rng.randint(*people)
        rows.append(make_context(rng, n_people, f"{split}-{seed}-{i}", filler=filler, facts=facts,
                                 shared_facts=shared_facts))
    return rows


def write_mrqa(path, rows, dataset="Synthetic", split="train"):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"header": {"dataset": dataset, "split": split}}) + "\n")
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def train_tokenizer(texts, vocab_size=2000) -> Tokenizer:
    """A byte-level BPE with RoBERTa's special tokens at RoBERTa's ids (<s>=0, <pad>=1, </s>=2, <unk>=3,
    <mask>=4) and its pair template, so that every part of tinyqa treats it like the real one."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False)
    return tok


def train_wordpiece(texts, vocab_size=4000) -> Tokenizer:
    """An uncased BERT WordPiece ([PAD] 0, [CLS] 2, [SEP] 3) trained on texts, laid out as transformers'
    BertConverter lays out a real one: the other tokenizer of the cross-tokenizer tests and benchmark."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return tok
