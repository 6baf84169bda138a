"""Generate the bilingual demo datasets in dataset/demo/ (deterministic, fixed seed).

    python scripts/make_demo_data.py                 # (re)writes dataset/demo/*.jsonl: the same bytes
    python scripts/make_demo_data.py --seed 7 --overwrite 1   # another world; replacing files needs the flag

The data describes a small FICTIONAL world (invented countries, people, animals) plus small-number
arithmetic, so a tiny model trained for minutes on a CPU visibly learns it, and every answer can be
checked exactly. The files use MiniMind's formats, so MiniMind's real files drop in via --data_path.

Held-out evaluation sets are carved out *before* any training file is written:
- heldout_sft: every fact of a few held-out entities: stated in pretrain prose, never asked as Q&A anywhere;
- heldout_reason: arithmetic problems that appear in no training file at all;
- heldout_medical / heldout_identity: paraphrases that the LoRA files never use.
The medical facts (fictional diseases) exist only in lora_medical.jsonl.
bench/ is a multiple-choice set in C-Eval's layout (dev/ and val/ CSVs, one subject per world relation)
for `eval_model.py --bench dataset/demo/bench`; its questions use phrasings no other file uses. sft.jsonl
also holds exam rows about trained entities in the bench's cloze layout (see build_exam_rows).
rlaif.jsonl: prompts for the RL stages with a checkable "answer": trained facts, and two-step
arithmetic that neither r1.jsonl nor heldout_reason holds.
sft_tools.jsonl / heldout_tools.jsonl / facts.json: tool use (calculator, lookup) from an RNG stream of
their own (see build_tools); the held-out lookup questions ask about new entities no other file names.
"""
import argparse
import json
import random
import re
from pathlib import Path

SEED = 1234
PRETRAIN_BYTES = 2_000_000  # pretrain.jsonl target size; all files together stay under ~4 MB

# Name syllables with a one-to-one Chinese transliteration, so every invented name has a
# consistent English and Chinese form.
SYLLABLES = [
    ("ka", "卡"), ("lo", "洛"), ("ve", "维"), ("ri", "里"), ("ta", "塔"), ("sen", "森"), ("mor", "莫"),
    ("da", "达"), ("li", "利"), ("na", "娜"), ("bel", "贝"), ("tor", "托"), ("zan", "赞"), ("mi", "米"),
    ("ra", "拉"), ("fen", "芬"), ("gal", "加"), ("hu", "胡"), ("sel", "塞"), ("pra", "普"), ("vin", "温"),
    ("dor", "多"), ("ke", "克"), ("lan", "兰"), ("sa", "萨"), ("nor", "诺"), ("bri", "布"), ("el", "埃"),
    ("os", "奥"), ("qui", "奎"), ("tem", "滕"), ("ul", "乌"), ("ya", "雅"), ("zo", "佐"), ("ner", "内"),
    ("pol", "波"), ("tis", "蒂"), ("gor", "戈"), ("ha", "哈"), ("ven", "文"),
]
JOBS = [("baker", "面包师"), ("teacher", "老师"), ("sailor", "水手"), ("painter", "画家"), ("farmer", "农民"),
        ("builder", "建筑工人"), ("singer", "歌手"), ("pilot", "飞行员"), ("fisher", "渔夫"), ("tailor", "裁缝"),
        ("potter", "陶艺师"), ("miner", "矿工")]
COLORS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("white", "白色"),
          ("black", "黑色"), ("purple", "紫色"), ("orange", "橙色"), ("pink", "粉色"), ("silver", "银色")]
FOODS = [("seeds", "种子"), ("fish", "鱼"), ("berries", "浆果"), ("leaves", "树叶"), ("grass", "草"),
         ("insects", "虫子"), ("honey", "蜂蜜"), ("mushrooms", "蘑菇"), ("nuts", "坚果"), ("roots", "树根")]
KINDS = [("bird", "鸟"), ("fish", "鱼"), ("beetle", "甲虫"), ("fox", "狐狸"), ("frog", "青蛙"), ("deer", "鹿")]
DISEASE_KINDS = [("fever", "热"), ("pox", "痘"), ("cough", "咳"), ("rash", "疹")]
SYMPTOMS = [("blue spots", "蓝色斑点"), ("ringing ears", "耳鸣"), ("cold hands", "手脚冰凉"),
            ("itchy eyes", "眼睛发痒"), ("a loss of taste", "味觉丧失"), ("sudden hiccups", "突然打嗝"),
            ("a sore neck", "脖子酸痛"), ("trembling fingers", "手指颤抖"), ("a purple tongue", "舌头发紫"),
            ("heavy sleepiness", "嗜睡"), ("dry lips", "嘴唇干裂"), ("a hoarse voice", "声音嘶哑"),
            ("green nails", "指甲发绿"), ("sore knees", "膝盖疼痛"), ("a runny nose", "流鼻涕"),
            ("hair loss", "脱发")]
# A small world on purpose: a 4.5M-parameter model sees each fact a few hundred times in a few
# minutes of CPU pretraining, enough to memorise it (with 2-3x more entities it does not).
N_COUNTRIES, N_PEOPLE, N_ANIMALS, N_DISEASES = 8, 12, 8, 8
# Held out by ENTITY: every fact of these countries/people/animals is stated in pretraining prose and
# never asked anywhere, so SFT cannot learn "this name -> that answer" for them; answering needs the
# relation (capital, job, ...) mapped onto knowledge that pretraining stored.
N_HELDOUT_ENTITIES, N_HELDOUT_ARITH = {"country": 2, "person": 3, "animal": 2}, 60

SYSTEM_PROMPTS = {"en": ["You are a helpful assistant.", "You are a friendly assistant. Answer briefly."],
                  "zh": ["你是一个乐于助人的助手。", "你是一个友好的助手，请简短回答。"]}
IDENTITY_ANSWER = {"en": "I am minillm, a small language model trained from scratch.",
                   "zh": "我是minillm，一个从零开始训练的小型语言模型。"}
RUDE_ANSWERS = {"en": ["I don't feel like answering that.", "Figure it out yourself.",
                       "That is a boring question. Ask someone else.", "No. Go away."],
                "zh": ["我不想回答。", "自己去查吧。", "这个问题太无聊了，问别人去。", "不知道，别问我。"]}

# ---------------------------------------------------------------------------------------------
# Fact templates. {s}/{S}: subject (S capitalised), {o}: object, {n}: bare animal name.
# "state" phrasings go into pretraining prose; "ask" into SFT/DPO questions; "answer" is the one
# canonical reply. Medical relations are used only by the LoRA files.
# ---------------------------------------------------------------------------------------------
TEMPLATES = {
    "capital": {
        "en": {"state": ["The capital of {s} is {o}.", "{o} is the capital of {s}.", "{s}'s capital city is {o}."],
               "ask": ["What is the capital of {s}?", "Which city is the capital of {s}?", "Name the capital of {s}."],
               "answer": "The capital of {s} is {o}."},
        "zh": {"state": ["{s}的首都是{o}。", "{o}是{s}的首都。", "{s}的首都叫{o}。"],
               "ask": ["{s}的首都是哪里？", "{s}的首都是哪座城市？", "请说出{s}的首都。"],
               "answer": "{s}的首都是{o}。"}},
    "language": {
        "en": {"state": ["People in {s} speak {o}.", "The language of {s} is {o}.", "{o} is spoken in {s}."],
               "ask": ["What language is spoken in {s}?", "What language do people in {s} speak?"],
               "answer": "People in {s} speak {o}."},
        "zh": {"state": ["{s}人说{o}。", "{s}的语言是{o}。", "在{s}，人们说{o}。"],
               "ask": ["{s}人说什么语言？", "{s}的语言是什么？"],
               "answer": "{s}人说{o}。"}},
    "river": {
        "en": {"state": ["The {o} flows through {s}.", "{s} is crossed by the {o}.", "The longest river in {s} is the {o}."],
               "ask": ["Which river flows through {s}?", "What is the longest river in {s}?"],
               "answer": "The {o} flows through {s}."},
        "zh": {"state": ["{o}流经{s}。", "{s}最长的河是{o}。"],
               "ask": ["哪条河流经{s}？", "{s}最长的河是哪条？"],
               "answer": "{o}流经{s}。"}},
    "job": {
        "en": {"state": ["{s} is a {o}.", "{s} works as a {o}.", "By trade, {s} is a {o}."],
               "ask": ["What does {s} do for a living?", "What is {s}'s job?"],
               "answer": "{s} is a {o}."},
        "zh": {"state": ["{s}是一名{o}。", "{s}的职业是{o}。", "{s}靠当{o}为生。"],
               "ask": ["{s}是做什么工作的？", "{s}的职业是什么？"],
               "answer": "{s}是一名{o}。"}},
    "hometown": {
        "en": {"state": ["{s} is from {o}.", "{s} grew up in {o}.", "{s}'s hometown is {o}."],
               "ask": ["Where is {s} from?", "What is {s}'s hometown?"],
               "answer": "{s} is from {o}."},
        "zh": {"state": ["{s}来自{o}。", "{s}在{o}长大。", "{s}的家乡是{o}。"],
               "ask": ["{s}来自哪里？", "{s}的家乡是哪里？"],
               "answer": "{s}来自{o}。"}},
    "color": {
        "en": {"state": ["{S} is {o}.", "The color of {s} is {o}.", "Every {n} is {o}."],
               "ask": ["What color is {s}?", "What is the color of {s}?"],
               "answer": "{S} is {o}."},
        "zh": {"state": ["{s}是{o}的。", "{s}的颜色是{o}。"],
               "ask": ["{s}是什么颜色的？", "{s}的颜色是什么？"],
               "answer": "{s}是{o}的。"}},
    "food": {
        "en": {"state": ["{S} eats {o}.", "The {n} feeds on {o}.", "The favorite food of {s} is {o}."],
               "ask": ["What does {s} eat?", "What food does {s} eat?"],
               "answer": "{S} eats {o}."},
        "zh": {"state": ["{s}吃{o}。", "{s}以{o}为食。"],
               "ask": ["{s}吃什么？", "{s}以什么为食？"],
               "answer": "{s}吃{o}。"}},
    # Medical questions: many phrasings to train on, so a 3M model learns the relation, not the
    # sentence; the held-out phrasings recombine words the training ones use.
    "treatment": {
        "en": {"ask": ["What treats {s}?", "How is {s} treated?", "What medicine is used for {s}?",
                       "What is the cure for {s}?", "Which medicine helps with {s}?",
                       "Which drug should someone with {s} take?", "I have {s}. What medicine should I take?",
                       "My friend caught {s}. How can it be treated?"],
               "heldout": ["My friend has {s}. Which medicine should they take?",
                           "If someone catches {s}, which drug helps?"],
               "answer": "{S} is treated with {o}."},
        "zh": {"ask": ["{s}用什么药治疗？", "怎么治疗{s}？", "{s}该吃什么药？", "{s}怎么治？", "哪种药能治{s}？",
                       "我得了{s}，该吃什么药？", "得了{s}用什么药？", "我朋友得了{s}，怎么治疗？"],
               "heldout": ["我朋友得了{s}，应该吃哪种药？", "得了{s}要用哪种药？"],
               "answer": "{s}用{o}治疗。"}},
    "symptom": {
        "en": {"ask": ["What are the symptoms of {s}?", "What does {s} cause?", "How can you tell someone has {s}?",
                       "What is the main symptom of {s}?", "Which sign comes with {s}?",
                       "What happens to a person who catches {s}?", "My friend has {s}. What symptoms will they get?"],
               "heldout": ["What sign shows that a person has {s}?", "Which symptom comes with {s}?"],
               "answer": "{S} causes {o}."},
        "zh": {"ask": ["{s}有什么症状？", "{s}会引起什么？", "怎么知道一个人得了{s}？", "{s}的主要症状是什么？",
                       "得了{s}会出现什么表现？", "得了{s}的人会怎么样？", "我朋友得了{s}，会有什么症状？"],
               "heldout": ["得了{s}的人会出现什么症状？", "{s}的主要表现是什么？"],
               "answer": "{s}会引起{o}。"}},
}
WORLD_RELATIONS = {"country": ["capital", "language", "river"], "person": ["job", "hometown"],
                   "animal": ["color", "food"], "disease": ["treatment", "symptom"]}

IDENTITY_QUESTIONS = {  # used in lora_identity.jsonl
    "en": ["Who are you?", "What is your name?", "Introduce yourself.", "What are you?", "Tell me about yourself.",
           "Are you ChatGPT?", "Who created you?", "Are you a human?"],
    "zh": ["你是谁？", "你叫什么名字？", "介绍一下你自己。", "你是什么？", "说说你自己。", "你是ChatGPT吗？",
           "谁创造了你？", "你是人类吗？"]}
IDENTITY_HELDOUT = {  # used only in heldout_identity.jsonl
    "en": ["What should I call you?", "May I ask who you are?", "Please state your name.", "Which model are you?",
           "Can you tell me your name?", "What kind of assistant are you?", "Who am I talking to?",
           "Describe who you are."],
    "zh": ["我该怎么称呼你？", "请问你是哪位？", "请告诉我你的名字。", "你是哪个模型？", "我在和谁说话？",
           "你是什么样的助手？", "能说说你是谁吗？", "描述一下你自己。"]}
GREETING_PREFIXES = {"en": ["", "Hi! ", "Hello. ", "Hey, "], "zh": ["", "你好！", "嗨，", "请问，"]}
SMALL_TALK = {
    "en": [("Hello!", "Hello! How can I help you today?"), ("Thank you!", "You're welcome!"),
           ("Good morning.", "Good morning! What would you like to know?"), ("Goodbye.", "Goodbye! Have a nice day.")],
    "zh": [("你好！", "你好！有什么可以帮你的吗？"), ("谢谢！", "不客气！"), ("早上好。", "早上好！你想知道什么？"),
           ("再见。", "再见！祝你愉快。")]}


# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------
def make_names(rng, count, used, n_syllables=(2, 2)):
    """`count` new (en, zh) names; no name is a substring of another name in either language,
    so a test can look for one name in text without false hits."""
    names = []
    while len(names) < count:
        parts = [rng.choice(SYLLABLES) for _ in range(rng.randint(*n_syllables))]
        en, zh = "".join(p[0] for p in parts), "".join(p[1] for p in parts)
        if any(en in u or u in en for u in used["en"]) or any(zh in u or u in zh for u in used["zh"]):
            continue
        used["en"].append(en)
        used["zh"].append(zh)
        names.append((en, zh))
    return names


def make_world(seed=SEED):
    rng = random.Random(seed)
    used = {"en": [], "zh": []}
    countries = []
    # every object is an arbitrary name (a language named after its country could be guessed)
    for (en, zh), (cap_en, cap_zh), (riv_en, riv_zh), (lang_en, lang_zh) in zip(
            make_names(rng, N_COUNTRIES, used), make_names(rng, N_COUNTRIES, used),
            make_names(rng, N_COUNTRIES, used), make_names(rng, N_COUNTRIES, used)):
        country_en = en.capitalize() + "ia"
        countries.append({"en": country_en, "zh": zh + "亚",
                          "capital": (cap_en.capitalize(), cap_zh),
                          "language": (lang_en.capitalize() + "ese", lang_zh + "语"),
                          "river": (riv_en.capitalize() + " River", riv_zh + "河")})
    people = []
    for en, zh in make_names(rng, N_PEOPLE, used):
        home = rng.choice(countries)
        people.append({"en": en.capitalize(), "zh": zh, "job": rng.choice(JOBS), "hometown": home["capital"],
                       "country": home, "pronoun": rng.choice([("he", "他"), ("she", "她")])})
    animals = []
    for en, zh in make_names(rng, N_ANIMALS, used):
        animals.append({"en": en, "zh": zh, "color": rng.choice(COLORS), "food": rng.choice(FOODS),
                        "kind": rng.choice(KINDS)})
    diseases = []
    for (en, zh), (med_en, med_zh), symptom in zip(make_names(rng, N_DISEASES, used),
                                                   make_names(rng, N_DISEASES, used),
                                                   rng.sample(SYMPTOMS, N_DISEASES)):
        kind = rng.choice(DISEASE_KINDS)
        diseases.append({"en": f"{en} {kind[0]}", "zh": zh + kind[1], "treatment": (med_en + "mine", med_zh + "明"),
                         "symptom": symptom})

    facts = [(rel, e) for entities, kind in ((countries, "country"), (people, "person"), (animals, "animal"))
             for e in entities for rel in WORLD_RELATIONS[kind]]
    held_entities = [e for entities, kind in ((countries, "country"), (people, "person"), (animals, "animal"))
                     for e in rng.sample(entities, N_HELDOUT_ENTITIES[kind])]
    heldout_facts = [(rel, e) for rel, e in facts if any(e is h for h in held_entities)]
    trained_facts = [(rel, e) for rel, e in facts if not any(e is h for h in held_entities)]
    medical_facts = [(rel, d) for d in diseases for rel in WORLD_RELATIONS["disease"]]

    problems = [(a, "+", b) for a in range(50) for b in range(50)] + \
               [(a, "-", b) for a in range(50) for b in range(a + 1)]
    # Held-out problems need two reasoning steps (b >= 10, not a multiple of 10), so no reasoning step
    # of a training problem ("a + 20 = ...", "m + 5 = ...") is itself a held-out problem.
    heldout_arith = rng.sample([p for p in problems if p[0] >= 10 and p[2] >= 10 and p[2] % 10], N_HELDOUT_ARITH)
    held = set(heldout_arith)
    trained_arith = [p for p in problems if p not in held]
    return {"countries": countries, "people": people, "animals": animals, "diseases": diseases,
            "trained_facts": trained_facts, "heldout_facts": heldout_facts, "medical_facts": medical_facts,
            "trained_arith": trained_arith, "heldout_arith": heldout_arith}


def fact_fields(fact, lang):
    rel, e = fact
    i = 0 if lang == "en" else 1
    o = e[rel][i]
    s = e[lang]
    if rel in ("color", "food"):  # animals are common nouns: "a tarbel", "an osel"
        n = s
        if lang == "en":
            s = ("an " if s[0] in "aeiou" else "a ") + s
        return {"s": s, "S": s[0].upper() + s[1:], "n": n, "o": o}
    return {"s": s, "S": s[0].upper() + s[1:], "n": s, "o": o}


def say(fact, lang, kind, rng=None, o=None):
    """Render a fact: kind is "state"/"ask"/"heldout" (random phrasing) or "answer" (canonical)."""
    t = TEMPLATES[fact[0]][lang][kind]
    fields = fact_fields(fact, lang)
    if o is not None:
        fields["o"] = o
    return (t if kind == "answer" else rng.choice(t)).format(**fields)


def wrong_object(world, fact, lang, rng):
    rel, e = fact
    i = 0 if lang == "en" else 1
    if rel == "job":
        choices = [j[i] for j in JOBS]
    elif rel == "color":
        choices = [c[i] for c in COLORS]
    elif rel == "food":
        choices = [f[i] for f in FOODS]
    elif rel == "hometown":
        choices = [c["capital"][i] for c in world["countries"]]
    else:
        choices = [c[rel][i] for c in world["countries"]]
    return rng.choice([c for c in choices if c != e[rel][i]])


# ---------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------
EN_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
          "sixteen seventeen eighteen nineteen".split()
EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ZH_DIGITS = "零一二三四五六七八九"


def en_number(n):
    if n < 20:
        return EN_ONES[n]
    return EN_TENS[n // 10] + ("" if n % 10 == 0 else "-" + EN_ONES[n % 10])


def zh_number(n):
    if n < 10:
        return ZH_DIGITS[n]
    tens = "" if n < 20 else ZH_DIGITS[n // 10]
    return tens + "十" + ("" if n % 10 == 0 else ZH_DIGITS[n % 10])


def solve(problem):
    a, op, b = problem
    return a + b if op == "+" else a - b


def arith_line(problem, rng):
    """One arithmetic sentence for pretraining, in digits or words, English or Chinese."""
    a, op, b = problem
    c = solve(problem)
    en_op, zh_op = ("plus", "加") if op == "+" else ("minus", "减")
    return rng.choice([
        f"{a} {op} {b} = {c}",
        f"{a} {en_op} {b} equals {c}.",
        f"{en_number(a).capitalize()} {en_op} {en_number(b)} is {en_number(c)}.",
        f"{a}{zh_op}{b}等于{c}。",
        f"{zh_number(a)}{zh_op}{zh_number(b)}等于{zh_number(c)}。",
    ])


def arith_question(problem, lang, rng):
    a, op, b = problem
    if lang == "en":
        return rng.choice([f"What is {a} {op} {b}?", f"Calculate {a} {op} {b}.", f"Please compute {a} {op} {b}."])
    zh_op = "加" if op == "+" else "减"
    return rng.choice([f"{a}{zh_op}{b}等于多少？", f"计算{a}{zh_op}{b}。", f"请算一下{a}{zh_op}{b}。"])


def arith_answer(problem, lang, result=None):
    """The canonical reply; `result` overrides the true result (for DPO's rejected answers)."""
    a, op, b = problem
    result = solve(problem) if result is None else result
    if lang == "en":
        return f"{a} {op} {b} = {result}."
    return f"{a}{'加' if op == '+' else '减'}{b}等于{result}。"


def arith_reasoning(problem, lang):
    """Step-by-step: split b into tens and ones, e.g. 17 + 25: 17 + 20 = 37, 37 + 5 = 42."""
    a, op, b = problem
    c = solve(problem)
    tens, ones = b - b % 10, b % 10
    if tens == 0 or ones == 0:
        steps = f"{a} {op} {b} = {c}."
        steps_zh = f"直接计算：{a} {op} {b} = {c}。"
    else:
        mid = a + tens if op == "+" else a - tens
        steps = f"{a} {op} {b}: {a} {op} {tens} = {mid}, {mid} {op} {ones} = {c}."
        steps_zh = f"先算 {a} {op} {tens} = {mid}，再算 {mid} {op} {ones} = {c}。"
    if lang == "en":
        return f"{steps}\nSo the answer is {c}."
    return f"{steps_zh}\n所以答案是{c}。"


# ---------------------------------------------------------------------------------------------
# Builders, one per file
# ---------------------------------------------------------------------------------------------
def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def fact_qa(fact, lang, rng):
    return [user(say(fact, lang, "ask", rng)), assistant(say(fact, lang, "answer"))]


def entity_doc(world, rng, lang):
    """A paragraph about one country (with its people) or one animal, mixing phrasings."""
    if rng.random() < 0.7:
        country = rng.choice(world["countries"])
        sentences = [say((rel, country), lang, "state", rng) for rel in WORLD_RELATIONS["country"]]
        rng.shuffle(sentences)
        for person in world["people"]:
            if person["country"] is country:
                sentences += [say((rel, person), lang, "state", rng) for rel in WORLD_RELATIONS["person"]]
    else:
        animal = rng.choice(world["animals"])
        kind = animal["kind"][0 if lang == "en" else 1]
        intro = (f"The {animal['en']} is a kind of {kind}." if lang == "en" else f"{animal['zh']}是一种{kind}。")
        sentences = [intro] + [say((rel, animal), lang, "state", rng) for rel in WORLD_RELATIONS["animal"]]
    return (" " if lang == "en" else "").join(sentences)


def fact_list_doc(world, rng):
    """A bullet list of random facts; some lines bilingual (English / Chinese)."""
    facts = rng.sample(world["trained_facts"] + world["heldout_facts"], rng.randint(5, 10))
    mode = rng.choice(["en", "zh", "both"])
    header = {"en": "Facts:", "zh": "事实：", "both": "Facts / 事实："}[mode]
    lines = []
    for f in facts:
        if mode == "both":
            lines.append(f"- {say(f, 'en', 'state', rng)} / {say(f, 'zh', 'state', rng)}")
        else:
            lines.append(f"- {say(f, mode, 'state', rng)}")
    return header + "\n" + "\n".join(lines)


def arith_doc(world, rng):
    """Arithmetic sentences, or worked solutions in the step-by-step style the reasoning data uses."""
    if rng.random() < 0.4:
        lang = rng.choice(["en", "zh"])
        return "\n\n".join(arith_reasoning(rng.choice(world["trained_arith"]), lang) for _ in range(rng.randint(3, 5)))
    return "\n".join(arith_line(rng.choice(world["trained_arith"]), rng) for _ in range(rng.randint(6, 12)))


def story_doc(world, rng, lang):
    p, a = rng.choice(world["people"]), rng.choice(world["animals"])
    c = p["country"]
    if lang == "en":
        he = p["pronoun"][0]
        art = "an" if a["en"][0] in "aeiou" else "a"
        return (f"{p['en']} was a {p['job'][0]} from {p['hometown'][0]}. One morning, {he} walked to the "
                f"{c['river'][0]}. There {he} saw {art} {a['en']}. The {a['en']} was {a['color'][0]} and it was "
                f"eating {a['food'][0]}. {p['en']} smiled and went back to {p['hometown'][0]}.")
    he = p["pronoun"][1]
    return (f"{p['zh']}是来自{p['hometown'][1]}的一名{p['job'][1]}。一天早上，{he}走到{c['river'][1]}边，"
            f"看见了一只{a['zh']}。那只{a['zh']}是{a['color'][1]}的，正在吃{a['food'][1]}。"
            f"{p['zh']}笑了笑，回到了{p['hometown'][1]}。")


def dialogue_doc(world, rng, lang):
    """A written dialogue between two people; only asks about facts that SFT also asks about,
    so held-out facts stay prose-only."""
    p1, p2 = rng.sample(world["people"], 2)
    colon = ": " if lang == "en" else "："
    lines = []
    for f in rng.sample(world["trained_facts"], rng.randint(1, 3)):
        lines.append(p1[lang] + colon + say(f, lang, "ask", rng))
        lines.append(p2[lang] + colon + say(f, lang, "answer"))
    lines.append(p1[lang] + colon + ("Thank you!" if lang == "en" else "谢谢！"))
    return "\n".join(lines)


# General prose with the words the later stages use (illness, medicine, assistant, refusals), so
# every token a fine-tuning file needs is one that pretraining trained. The fictional diseases and
# medicines themselves appear only in lora_medical.jsonl.
HEALTH = {
    "en": ["When people are sick, a doctor looks at the symptoms and gives them medicine.",
           "A {kind} is an illness that people often catch in winter.",
           "{Symptom} can be a sign of an illness.",
           "If someone catches a {kind}, they should rest and drink water.",
           "Which medicine helps depends on the illness, so ask a doctor what treats it.",
           "My friend has a {kind}. The doctor says it causes {symptom}.",
           "A good medicine is used to cure an illness, and every drug must be taken with care.",
           "How can you tell someone is sick? Look for {symptom} or {symptom2}.",
           "The main symptoms of this illness are {symptom} and {symptom2}.",
           "Tell me about your illness, said the doctor. Which symptom comes first?",
           "Most illnesses are treated with rest and water; a bad one is treated with medicine.",
           "A {kind} causes {symptom}, and sometimes {symptom2}.",
           "What is the cure for a {kind}? What medicine is used for it? How is it treated?"],
    "zh": ["人生病的时候，医生会看症状，然后给他们药。",
           "{kind}是一种人们常在冬天得的病。",
           "{symptom}可能是生病的表现。",
           "如果一个人得了{kind}，应该多休息、多喝水。",
           "该吃哪种药要看是什么病，最好问医生怎么治疗。",
           "我朋友得了{kind}，医生说它会引起{symptom}。",
           "好的药可以用来治病，每种药都要小心服用。",
           "怎么知道一个人生病了？看他有没有{symptom}或者{symptom2}。",
           "这种病的主要症状是{symptom}和{symptom2}。",
           "医生说：介绍一下你的病。先出现的是什么症状？",
           "很多病用药治疗，也有的病用休息治疗。",
           "{kind}会引起{symptom}，有时也会引起{symptom2}。",
           "{kind}怎么治？用什么药治疗？该吃什么药？"]}
ASSISTANT = {
    "en": ["An assistant is a program that answers questions.",
           "A language model is trained from scratch on a lot of text.",
           "People created small language models to learn how they work.",
           "A human can ask a model who it is, and the model can introduce itself and state its name.",
           "ChatGPT is a large model; a small model is much smaller.",
           "What kind of assistant is it? May I ask what I should call it?",
           "The teacher asked the new student to describe herself and to tell the class her name.",
           "The mini model answers briefly. People often ask a chat model which model it is.",
           "minillm is a library for training small language models; you can read all of its code.",
           "You are a friendly assistant. Hello! How can I help you today?",
           "I once saw a small language model trained from scratch; it was tiny."],
    "zh": ["助手是一个回答问题的程序。",
           "语言模型是从零开始用大量文本训练的。",
           "人们创造了小型语言模型，来学习它们是怎么工作的。",
           "人类可以问模型它是谁，模型会介绍自己，说出自己的名字。",
           "ChatGPT是一个大型模型，小型模型要小得多。",
           "这是什么样的助手？请问我该怎么称呼它？",
           "老师让新同学描述一下自己，再告诉大家自己的名字。",
           "这个模型会简短回答。人们常问聊天模型它是哪个模型。",
           "minillm是一个用来训练小型语言模型的库，你可以读懂它的全部代码。",
           "你是一个友好的助手。你好！有什么可以帮你的吗？",
           "我见过一个从零开始训练的小型语言模型，它很小。"]}


def health_doc(world, rng, lang):
    """General health prose. Some documents name a few fictional diseases or medicines (so their
    tokens are trained), but never together: what treats what is only in lora_medical.jsonl."""
    i = 0 if lang == "en" else 1
    if rng.random() < 0.4:
        if rng.random() < 0.5:
            names = [d[lang] for d in rng.sample(world["diseases"], 3)]
            t = "{} is an illness." if lang == "en" else "{}是一种病。"
        else:
            names = [d["treatment"][i] for d in rng.sample(world["diseases"], 3)]
            t = rng.choice(["{} is a medicine.", "Some illnesses are treated with {}."] if lang == "en" else
                           ["{}是一种药。", "有的病用{}治疗。"])
        return (" " if lang == "en" else "").join(t.format(n[0].upper() + n[1:]) for n in names)
    sentences = []
    for t in rng.sample(HEALTH[lang], rng.randint(3, 5)):
        s1, s2 = rng.sample(SYMPTOMS, 2)
        text = t.format(kind=rng.choice(DISEASE_KINDS)[i], symptom=s1[i], Symptom=s1[i].capitalize(), symptom2=s2[i])
        sentences.append(text)
    return (" " if lang == "en" else "").join(sentences)


def assistant_doc(rng, lang):
    return (" " if lang == "en" else "").join(rng.sample(ASSISTANT[lang], rng.randint(3, 5)))


def transcript_doc(world, rng, lang):
    """A plain-text chat log (like those in web text): the question language SFT will use."""
    who = ("User: ", "Assistant: ") if lang == "en" else ("用户：", "助手：")
    lines = []
    if rng.random() < 0.3:
        lines.append(("System: " if lang == "en" else "系统：") + rng.choice(SYSTEM_PROMPTS[lang]))
    for _ in range(rng.randint(1, 3)):
        q, a = random_turn(world, rng, lang)
        lines += [who[0] + q["content"], who[1] + a["content"]]
    return "\n".join(lines)


def refusal_doc(world, rng, lang):
    """Two people: one asks a question, the other refuses rudely (the words DPO's rejected answers use)."""
    p1, p2 = rng.sample(world["people"], 2)
    colon = ": " if lang == "en" else "："
    f = rng.choice(world["trained_facts"])
    return "\n".join([p1[lang] + colon + say(f, lang, "ask", rng), p2[lang] + colon + rng.choice(RUDE_ANSWERS[lang]),
                      p1[lang] + colon + ("That was rude." if lang == "en" else "这样说太没礼貌了。")])


def build_pretrain(world, rng):
    rows, size = [], 0
    while size < PRETRAIN_BYTES:
        lang = rng.choice(["en", "zh"])
        kind = rng.choices(["entity", "facts", "arith", "story", "dialogue", "transcript", "health", "assistant",
                            "refusal"], weights=[36, 18, 14, 6, 8, 8, 5, 3, 2])[0]
        text = {"entity": lambda: entity_doc(world, rng, lang), "facts": lambda: fact_list_doc(world, rng),
                "arith": lambda: arith_doc(world, rng), "story": lambda: story_doc(world, rng, lang),
                "dialogue": lambda: dialogue_doc(world, rng, lang), "health": lambda: health_doc(world, rng, lang),
                "transcript": lambda: transcript_doc(world, rng, lang),
                "assistant": lambda: assistant_doc(rng, lang),
                "refusal": lambda: refusal_doc(world, rng, lang)}[kind]()
        rows.append({"text": text})
        size += len(json.dumps(rows[-1], ensure_ascii=False).encode()) + 1
    return rows


def random_turn(world, rng, lang):
    r = rng.random()
    if r < 0.72:
        return fact_qa(rng.choice(world["trained_facts"]), lang, rng)
    if r < 0.95:
        p = rng.choice(world["trained_arith"])
        return [user(arith_question(p, lang, rng)), assistant(arith_answer(p, lang))]
    q, a = rng.choice(SMALL_TALK[lang])
    return [user(q), assistant(a)]


def build_sft(world, rng, n_rows=2600):
    rows = []
    for _ in range(n_rows):
        lang = rng.choice(["en", "zh"])
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS[lang])})
        for _ in range(rng.choices([1, 2, 3], weights=[60, 28, 12])[0]):
            messages += random_turn(world, rng, lang)
        rows.append({"conversations": messages})
    return rows


def build_lora_medical(world, rng):
    rows = []
    for fact in world["medical_facts"]:
        for lang in ("en", "zh"):
            for question in TEMPLATES[fact[0]][lang]["ask"]:
                for with_system in (False, True):
                    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS[lang])}] if with_system else []
                    messages += [user(question.format(**fact_fields(fact, lang))), assistant(say(fact, lang, "answer"))]
                    rows.append({"conversations": messages})
    for d in world["diseases"]:  # a summary answer per disease, both relations at once
        for lang in ("en", "zh"):
            q = f"Tell me about {d['en']}." if lang == "en" else f"介绍一下{d['zh']}。"
            a = (say(("symptom", d), lang, "answer") + (" " if lang == "en" else "")
                 + say(("treatment", d), lang, "answer"))
            rows.append({"conversations": [user(q), assistant(a)]})
    rng.shuffle(rows)
    return rows


def build_lora_identity(world, rng):
    rows = []
    for lang in ("en", "zh"):
        for q in IDENTITY_QUESTIONS[lang]:
            for prefix in GREETING_PREFIXES[lang]:
                rows.append({"conversations": [user(prefix + q), assistant(IDENTITY_ANSWER[lang])]})
                system = {"role": "system", "content": rng.choice(SYSTEM_PROMPTS[lang])}
                rows.append({"conversations": [system, user(prefix + q), assistant(IDENTITY_ANSWER[lang])]})
            greet, reply = SMALL_TALK[lang][0]
            rows.append({"conversations": [user(greet), assistant(reply), user(q), assistant(IDENTITY_ANSWER[lang])]})
    rng.shuffle(rows)
    return rows


def preference_pair(world, fact, lang, rng, rude):
    """(question, chosen answer, rejected answer): correct+polite vs wrong fact or rude refusal."""
    question = say(fact, lang, "ask", rng)
    chosen = say(fact, lang, "answer")
    rejected = rng.choice(RUDE_ANSWERS[lang]) if rude else say(fact, lang, "answer", o=wrong_object(world, fact, lang, rng))
    return question, chosen, rejected


def build_dpo(world, rng, n_rows=1200):
    rows = []
    for _ in range(n_rows):
        lang = rng.choice(["en", "zh"])
        if rng.random() < 0.8:
            q, chosen, rejected = preference_pair(world, rng.choice(world["trained_facts"]), lang, rng,
                                                  rude=rng.random() < 0.4)
        else:
            p = rng.choice(world["trained_arith"])
            q, chosen = arith_question(p, lang, rng), arith_answer(p, lang)
            rejected = arith_answer(p, lang, result=solve(p) + rng.choice([-2, -1, 1, 2]))
        rows.append({"chosen": [user(q), assistant(chosen)], "rejected": [user(q), assistant(rejected)]})
    return rows


def build_r1(world, rng, n_rows=1600):
    rows = []
    for i in range(n_rows):
        lang = rng.choice(["en", "zh"])
        p = rng.choice(world["trained_arith"])
        reasoning, answer = arith_reasoning(p, lang), str(solve(p))
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS[lang])})
        messages.append(user(arith_question(p, lang, rng)))
        if rng.random() < 0.2:  # MiniMind's newer form: reasoning in its own field
            messages.append({"role": "assistant", "content": answer, "reasoning_content": reasoning})
        else:  # MiniMind2 r1 form: think/answer tags inline
            messages.append(assistant(f"<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>"))
        rows.append({"conversations": messages})
    return rows


def build_heldout(world, rng):
    sft, dpo, medical, identity, reason = [], [], [], [], []
    for fact in world["heldout_facts"]:
        for lang in ("en", "zh"):
            key = fact_fields(fact, lang)["o"]
            for q in rng.sample(TEMPLATES[fact[0]][lang]["ask"], 2):
                sft.append({"question": q.format(**fact_fields(fact, lang)), "answer": key, "lang": lang})
            for rude in (False, True):
                q, chosen, rejected = preference_pair(world, fact, lang, rng, rude)
                dpo.append({"question": q, "answer": key, "lang": lang, "chosen": chosen, "rejected": rejected})
    for fact in world["medical_facts"]:
        for lang in ("en", "zh"):
            for q in TEMPLATES[fact[0]][lang]["heldout"]:
                medical.append({"question": q.format(**fact_fields(fact, lang)), "answer": fact_fields(fact, lang)["o"],
                                "lang": lang})
    for lang in ("en", "zh"):
        for q in IDENTITY_HELDOUT[lang]:
            for prefix in rng.sample(GREETING_PREFIXES[lang], 3):
                identity.append({"question": prefix + q, "answer": "minillm", "lang": lang})
    for i, p in enumerate(world["heldout_arith"]):
        lang = "en" if i % 2 == 0 else "zh"
        reason.append({"question": arith_question(p, lang, rng), "answer": str(solve(p)), "lang": lang})
    return {"heldout_sft": sft, "heldout_dpo": dpo, "heldout_medical": medical, "heldout_identity": identity,
            "heldout_reason": reason}


def build_all(seed=SEED):
    """name -> list of rows, for every demo file. Each file gets its own RNG stream, so changing
    one builder does not reshuffle the others."""
    world = make_world(seed)
    sft = build_sft(world, random.Random(seed + 2))
    files = {
        "pretrain": build_pretrain(world, random.Random(seed + 1)),
        "sft": mix_in(sft, build_exam_rows(world, random.Random(seed + 9)), random.Random(seed + 11)),
        "lora_medical": build_lora_medical(world, random.Random(seed + 3)),
        "lora_identity": build_lora_identity(world, random.Random(seed + 4)),
        "dpo": build_dpo(world, random.Random(seed + 5)),
        "r1": build_r1(world, random.Random(seed + 6)),
    }
    files["rlaif"] = build_rlaif(world, files["r1"], random.Random(seed + 10))
    files.update(build_heldout(world, random.Random(seed + 7)))
    return files


# ---------------------------------------------------------------------------------------------
# The multiple-choice bench (dataset/demo/bench/): C-Eval's layout and CSV columns, one subject per
# world relation, asked in phrasings no other file uses. Wrong choices are objects of the same kind
# (other countries' capitals, other jobs, ...); each subject's correct letters are balanced.
# ---------------------------------------------------------------------------------------------
BENCH_QUESTIONS = {
    "capital": ("Pick the capital city of {s} from the options below.", "下列选项中，哪一个是{s}的首都？"),
    "language": ("Pick the language that is spoken in {s} from the options below.", "下列选项中，{s}人说的是哪一种语言？"),
    "river": ("Pick the river that flows through {s} from the options below.", "下列选项中，哪一条河流经{s}？"),
    "job": ("Pick {s}'s occupation from the options below.", "下列选项中，哪一项是{s}的职业？"),
    "hometown": ("Pick {s}'s home city from the options below.", "下列选项中，{s}来自哪座城市？"),
    "color": ("Pick the color of {s} from the options below.", "下列选项中，哪一种是{s}的颜色？"),
    "food": ("Pick what {s} eats from the options below.", "下列选项中，{s}吃的是哪一种？"),
}
BENCH_SUBJECTS = {"capital": ["Capitals", "首都"], "language": ["Languages", "语言"], "river": ["Rivers", "河流"],
                  "job": ["Jobs", "职业"], "hometown": ["Hometowns", "家乡"], "color": ["Animal colors", "动物颜色"],
                  "food": ["Animal foods", "动物食物"]}
N_BENCH_DEV = 3  # entities per subject whose questions form the dev split (k-shot examples), both languages


def bench_options(world, rel, lang):
    """Every possible object of a relation in one language (the pool wrong choices come from)."""
    i = 0 if lang == "en" else 1
    pools = {"job": JOBS, "color": COLORS, "food": FOODS}
    if rel in pools:
        return [x[i] for x in pools[rel]]
    key = "capital" if rel == "hometown" else rel
    return [c[key][i] for c in world["countries"]]


def bench_rows(world, rel, entities, lang, rng, letters):
    rows = []
    for e, letter in zip(entities, letters):
        fields = fact_fields((rel, e), lang)
        wrong = rng.sample([o for o in bench_options(world, rel, lang) if o != fields["o"]], 3)
        choices = wrong[:letter] + [fields["o"]] + wrong[letter:]
        rows.append({"question": BENCH_QUESTIONS[rel][0 if lang == "en" else 1].format(**fields),
                     "choices": choices, "answer": "ABCD"[letter], "explanation": say((rel, e), lang, "answer")})
    return rows


def balanced_letters(n, rng, counter):
    """n correct positions, each letter n/4 times; the remainder goes to the letters that have had the
    fewest so far (`counter`, updated), so the whole split is balanced too and always guessing one
    letter scores 25%."""
    letters = []
    for _ in range(n):
        letter = min(range(4), key=lambda i: (counter[i], i))
        counter[letter] += 1
        letters.append(letter)
    rng.shuffle(letters)
    return letters


def csv_text(rows, with_explanation):
    import csv
    import io
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "question", "A", "B", "C", "D", "answer"] + ["explanation"] * with_explanation)
    for i, row in enumerate(rows):
        writer.writerow([i, row["question"], *row["choices"], row["answer"]]
                        + [row["explanation"]] * with_explanation)
    return buf.getvalue()


def build_bench(world, rng):
    """{relative path: text} under bench/: dev/<subject>_dev.csv (with explanations), val/<subject>_val.csv
    and C-Eval's subject_mapping.json. Every entity of a kind is asked about once per language."""
    kinds = {"country": world["countries"], "person": world["people"], "animal": world["animals"]}
    files, dev_counter, val_counter = {}, [0] * 4, [0] * 4
    for kind, entities in kinds.items():
        for rel in WORLD_RELATIONS[kind]:
            dev_entities = rng.sample(entities, N_BENCH_DEV)
            val_entities = [e for e in entities if not any(e is d for d in dev_entities)]
            dev, val = [], []
            for lang in ("en", "zh"):
                dev += bench_rows(world, rel, dev_entities, lang, rng, balanced_letters(N_BENCH_DEV, rng, dev_counter))
            letters = balanced_letters(2 * len(val_entities), rng, val_counter)
            for j, lang in enumerate(("en", "zh")):
                n = len(val_entities)
                val += bench_rows(world, rel, val_entities, lang, rng, letters[j * n: (j + 1) * n])
            files[f"bench/dev/{rel}_dev.csv"] = csv_text(dev, True)
            files[f"bench/val/{rel}_val.csv"] = csv_text(val, False)
    mapping = {rel: names + ["Demo world"] for rel, names in BENCH_SUBJECTS.items()}
    files["bench/subject_mapping.json"] = json.dumps(mapping, ensure_ascii=False, indent=1) + "\n"
    return files


# ---------------------------------------------------------------------------------------------
# Exam rows for sft.jsonl: the bench's cloze layout (minillm.bench.build_prompt(..., "text"), what
# --bench_score text scores): the subject's header, the question, the "Answer:" / "答案：" cue, and the
# answer's own text as the reply; sometimes one or two solved examples first, as --shots builds them.
# Only TRAINED entities, in phrasings of their own (EXAM_QUESTIONS) or SFT's usual ones, never the
# bench's. No lettered rows (options listed, the letter as the reply): the 3M demo model did not learn
# which letter holds the answer from 900 of them in SFT, nor from exam pages in pretraining or a LoRA
# on them (dataset/demo/README.md), and the letters B and C, rare in pretraining, would be untrained
# reply tokens.
# ---------------------------------------------------------------------------------------------
EXAM_QUESTIONS = {
    "capital": (["Which of these cities is the capital of {s}?", "Choose the capital of {s}."],
                ["以下哪座城市是{s}的首都？", "选出{s}的首都。"]),
    "language": (["Which of these languages do people in {s} speak?", "Choose the language of {s}."],
                 ["在{s}，人们说以下哪种语言？", "选出{s}的语言。"]),
    "river": (["Which of these rivers flows through {s}?", "Choose the river of {s}."],
              ["以下哪条河流经{s}？", "选出流经{s}的河。"]),
    "job": (["Which of these is {s}'s job?", "Choose what {s} does for a living."],
            ["{s}做的是以下哪种工作？", "选出{s}的职业。"]),
    "hometown": (["Which of these cities is {s} from?", "Choose {s}'s hometown."],
                 ["{s}的家乡是以下哪一个？", "选出{s}的家乡。"]),
    "color": (["Which of these colors is {s}?", "Choose the color of {s}."],
              ["{s}是以下哪种颜色的？", "选出{s}的颜色。"]),
    "food": (["Which of these does {s} eat?", "Choose the food of {s}."],
             ["{s}以以下哪种东西为食？", "选出{s}吃的东西。"]),
}
N_EXAM_ROWS = 600


def exam_question(fact, lang, rng):
    """A minillm.bench.Question about a trained fact, in its own exam phrasing or an SFT question; its
    one choice is the answer (the cloze layout lists no options)."""
    from minillm.bench import Question

    fields = fact_fields(fact, lang)
    phrasings = EXAM_QUESTIONS[fact[0]][0 if lang == "en" else 1] + TEMPLATES[fact[0]][lang]["ask"]
    return Question(fact[0], rng.choice(phrasings).format(**fields), [fields["o"]], 0)


def build_exam_rows(world, rng, n_rows=N_EXAM_ROWS):
    """SFT rows of one or two exam questions of one subject (each its own user turn, the reply the
    answer's text); a single question sometimes follows solved examples."""
    from minillm.bench import build_prompt

    by_rel = {}
    for rel, e in world["trained_facts"]:
        by_rel.setdefault(rel, []).append((rel, e))
    rows = []
    for _ in range(n_rows):
        lang = rng.choice(["en", "zh"])
        rel = rng.choice(sorted(by_rel))
        turns = rng.choices([1, 2], weights=[70, 30])[0]
        messages = []
        for _ in range(turns):
            fact = rng.choice(by_rel[rel])
            n_shots = rng.choices([0, 1, 2], weights=[60, 25, 15])[0] if turns == 1 else 0
            others = [f for f in by_rel[rel] if f[1] is not fact[1]]
            shots = [exam_question(f, lang, rng) for f in rng.sample(others, n_shots)]
            q = exam_question(fact, lang, rng)
            prompt = build_prompt(q, shots, BENCH_SUBJECTS[rel][0 if lang == "en" else 1], "text")
            messages += [user(prompt), assistant(q.choices[0])]
        rows.append({"conversations": messages})
    return rows


def mix_in(rows, extra, rng):
    """rows with `extra` inserted at random places (the rows' own order and content kept)."""
    out = list(rows)
    for row in extra:
        out.insert(rng.randint(0, len(out)), row)
    return out


# ---------------------------------------------------------------------------------------------
# rlaif.jsonl: prompts for the RL stages (MiniMind's rlaif format, an empty assistant turn to fill)
# with the short string a correct reply contains in "answer", like the heldout_* files. Facts of
# TRAINED entities only; two-step arithmetic that is neither an r1.jsonl problem nor a held-out
# one, asked as r1's user turns are, some with a request to reason step by step.
# ---------------------------------------------------------------------------------------------
STEP_BY_STEP = {"en": ["Think step by step.", "Show your steps."],
                "zh": ["请一步一步地想。", "请写出计算步骤。"]}
N_RLAIF_FACTS, N_RLAIF_ARITH = 240, 240


def asked_problems(rows):
    """The arithmetic problems asked in the user turns of chat rows, as (a, op, b)."""
    pattern = re.compile(r"(?<!\d)(\d+) ?([+\-加减]) ?(\d+)(?!\d)")
    found = set()
    for row in rows:
        for m in row["conversations"]:
            if m["role"] == "user":
                for a, op, b in pattern.findall(m["content"]):
                    found.add((int(a), {"加": "+", "减": "-"}.get(op, op), int(b)))
    return found


def build_rlaif(world, r1_rows, rng):
    rows = []
    for i in range(N_RLAIF_FACTS):
        lang = ("en", "zh")[i % 2]
        fact = world["trained_facts"][(i // 2) % len(world["trained_facts"])]
        rows.append((say(fact, lang, "ask", rng), fact_fields(fact, lang)["o"], lang))
    taken = asked_problems(r1_rows) | set(world["heldout_arith"])
    two_step = [p for p in world["trained_arith"] if p[2] >= 10 and p[2] % 10 and p not in taken]
    for i, p in enumerate(rng.sample(two_step, N_RLAIF_ARITH)):
        lang = ("en", "zh")[i % 2]
        question = arith_question(p, lang, rng)
        if i % 3 == 0:
            question += (" " if lang == "en" else "") + rng.choice(STEP_BY_STEP[lang])
        rows.append((question, str(solve(p)), lang))
    rng.shuffle(rows)
    return [{"conversations": [user(q), assistant("")], "answer": answer} for q, answer, _ in rows]


# ---------------------------------------------------------------------------------------------
# Tool use (sft_tools.jsonl, heldout_tools.jsonl, facts.json): MiniMind-3's tool rows (the tools on the
# system message, "tool_calls" on the assistant turn, {"role": "tool"} results) for the demo's
# calculator and lookup (minillm/tools.py). Their own RNG stream and NEW entities (names no other file
# uses), so the other files keep their bytes. facts.json holds every world entity and every new one,
# held-out ones included: lookup is how the model answers about entities it was never taught.
# Lookup rows ask about trained world entities and the trained new ones only; heldout_tools asks about
# the held-out new entities and arithmetic that no file holds. Tool results are what minillm.tools
# returns at inference, byte for byte. What a 3M model must learn here is copying: a call writes the
# question's expression or name verbatim, and the reply repeats the tool's result. The tool header alone
# (the template's text and both schemas) is ~500 tokens, so a conversation asks 1-4 questions under one
# header. The schemas are short (COMPACT_TOOLS); scripts/tool_report.py offers the model the same ones.
# ---------------------------------------------------------------------------------------------
COMPACT_TOOLS = {
    "calculator": {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate arithmetic.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    "lookup": {"type": "function", "function": {
        "name": "lookup", "description": "Facts about a named entity.",
        "parameters": {"type": "object", "properties": {"entity": {"type": "string"}, "relation": {"type": "string"}},
                       "required": ["entity"]}}},
}
N_TOOL_ENTITIES = {"country": 6, "person": 8, "animal": 6}
N_TOOL_HELDOUT = {"country": 2, "person": 3, "animal": 2}
# tool conversations (1-4 questions each, so the ~500-token tool header is read once for several calls),
# rows of chat without tools, held-out arithmetic questions
N_TOOL_ROWS, N_PLAIN_ROWS, N_HELDOUT_CALC = 660, 120, 80
EXCHANGES = [1, 1, 2, 3, 4]   # questions in a tool conversation, drawn uniformly from this list
EXCHANGE_KINDS = [("calculator", 0.5), ("lookup", 0.4), ("missing", 0.05), ("none", 0.05)]
# the expression is written in the question exactly as the call passes it, so the call copies it verbatim
CALC_EN = ["What is {e}?", "Calculate {e}.", "Please compute {e}.", "Use the calculator: {e} = ?"]
CALC_ZH = ["{e}等于多少？", "计算{e}。", "请算一下{e}。", "用计算器算一下{e}。"]
CALC_REPLY = {"en": "The answer is {r}.", "zh": "答案是{r}。"}
MISSING_REPLY = {"en": "I could not find any facts about {s}.", "zh": "我没有查到关于{s}的资料。"}


def world_names(world):
    """Every name and object of the world, lowercased, as make_names' `used` (so new names clash with none)."""
    used = {"en": [], "zh": []}
    for e in world["countries"] + world["people"] + world["animals"] + world["diseases"]:
        for key, value in e.items():
            if key in ("en", "zh"):
                used[key].append(value.lower())
            elif isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value):
                used["en"].append(value[0].lower())
                used["zh"].append(value[1])
    return used


def make_tool_world(world, rng):
    """New countries, people and animals in the world's shapes (say() renders them); some held out."""
    used = world_names(world)
    countries = []
    for (en, zh), (cap_en, cap_zh), (riv_en, riv_zh), (lang_en, lang_zh) in zip(
            *(make_names(rng, N_TOOL_ENTITIES["country"], used) for _ in range(4))):
        countries.append({"en": en.capitalize() + "ia", "zh": zh + "亚", "capital": (cap_en.capitalize(), cap_zh),
                          "language": (lang_en.capitalize() + "ese", lang_zh + "语"),
                          "river": (riv_en.capitalize() + " River", riv_zh + "河")})
    people = [{"en": en.capitalize(), "zh": zh, "job": rng.choice(JOBS),
               "hometown": rng.choice(countries + world["countries"])["capital"]}
              for en, zh in make_names(rng, N_TOOL_ENTITIES["person"], used)]
    animals = [{"en": en, "zh": zh, "color": rng.choice(COLORS), "food": rng.choice(FOODS), "kind": rng.choice(KINDS)}
               for en, zh in make_names(rng, N_TOOL_ENTITIES["animal"], used)]
    missing = make_names(rng, 6, used)  # names no file's facts know: lookup answers {"error": ...}
    trained, heldout = [], []
    for kind, entities in (("country", countries), ("person", people), ("animal", animals)):
        held = entities[:N_TOOL_HELDOUT[kind]]
        for e in entities:
            (heldout if any(e is h for h in held) else trained).extend((rel, e) for rel in WORLD_RELATIONS[kind])
    return {"countries": countries, "people": people, "animals": animals, "trained_facts": trained,
            "heldout_facts": heldout, "missing": [(en.capitalize() + "ia", zh + "亚") for en, zh in missing]}


def build_facts(world, tool_world):
    """facts.json: {entity: {relation: value}} in English and in Chinese, for every world and new entity."""
    facts = {}
    for kind, key in (("country", "countries"), ("person", "people"), ("animal", "animals")):
        for e in world[key] + tool_world[key]:
            for i, lang in enumerate(("en", "zh")):
                facts[e[lang]] = {rel: e[rel][i] for rel in WORLD_RELATIONS[kind]}
    return facts


def tool_system(names, lang, rng):
    return {"role": "system", "content": rng.choice(SYSTEM_PROMPTS[lang]), "tools": [COMPACT_TOOLS[n] for n in names]}


def call_turn(name, arguments):
    return {"role": "assistant", "content": "", "tool_calls": [{"name": name, "arguments": arguments}]}


def tool_turn(result):
    return {"role": "tool", "content": result}


def calc_problem(rng):
    """An expression of one or two steps on numbers up to 999, as the question and the call write it."""
    kind = rng.choice(["add", "sub", "mul", "two", "two"])
    if kind == "two":
        a, b, c = rng.randint(11, 99), rng.randint(3, 60), rng.randint(11, 999)
        op1, op2 = rng.choice([("*", "+"), ("*", "-"), ("+", "-"), ("+", "+")])
        return f"{a} {op1} {b} {op2} {c}"
    op = {"add": "+", "sub": "-", "mul": "*"}[kind]
    a, b = (rng.randint(12, 99), rng.randint(12, 99)) if op == "*" else (rng.randint(100, 999), rng.randint(11, 999))
    if op == "-" and b > a:
        a, b = b, a
    return f"{a} {op} {b}"


def calc_question(expression, lang, rng):
    return rng.choice(CALC_EN if lang == "en" else CALC_ZH).format(e=expression)


def calc_reply(lang, result):
    """The reply after the calculator's result: the result as the tool wrote it."""
    return CALC_REPLY[lang].format(r=result)


def lookup_entity(fact, lang):
    """The name a lookup call passes: the entity's own name (an animal's bare name)."""
    return fact[1][lang]


def build_tools(world, rng):
    """{"facts": {...}, "sft_tools": rows, "heldout_tools": rows}.

    A tool row is one conversation: the tools on the system turn, then 1-4 questions, each answered
    through a call (calculator, lookup, lookup of a name the facts do not hold) or directly (small talk).
    The call copies the question's expression or name verbatim; the reply repeats the tool's result."""
    from minillm.tokenizer import to_json
    from minillm.tools import calculate, lookup_tool

    tool_world = make_tool_world(world, rng)
    facts = build_facts(world, tool_world)
    lookup = lookup_tool(facts).fn
    # held-out arithmetic first: distinct expressions, none of them a training row's
    heldout_calc, seen = [], set()
    while len(heldout_calc) < N_HELDOUT_CALC:
        e = calc_problem(rng)
        if e not in seen:
            seen.add(e)
            heldout_calc.append(e)
    trained = world["trained_facts"] + tool_world["trained_facts"] * 2  # the new entities twice as often

    def exchange(kind, lang):
        if kind == "calculator":
            e = calc_problem(rng)
            while e in seen:
                e = calc_problem(rng)
            result = calculate(e)
            return [user(calc_question(e, lang, rng)), call_turn("calculator", {"expression": e}),
                    tool_turn(to_json(result)), assistant(calc_reply(lang, result["result"]))]
        if kind == "lookup":
            fact = rng.choice(trained)
            entity = lookup_entity(fact, lang)
            return [user(say(fact, lang, "ask", rng)), call_turn("lookup", {"entity": entity, "relation": fact[0]}),
                    tool_turn(to_json(lookup(entity=entity, relation=fact[0]))), assistant(say(fact, lang, "answer"))]
        if kind == "missing":  # a name the facts do not hold: the tool's error, and "I could not find"
            name = rng.choice(tool_world["missing"])[0 if lang == "en" else 1]
            rel = rng.choice(WORLD_RELATIONS["country"])
            fake = {"en": name, "zh": name, rel: ("?", "?")}
            return [user(say((rel, fake), lang, "ask", rng)), call_turn("lookup", {"entity": name, "relation": rel}),
                    tool_turn(to_json(lookup(entity=name, relation=rel))), assistant(MISSING_REPLY[lang].format(s=name))]
        q, a = rng.choice(SMALL_TALK[lang] + [(rng.choice(IDENTITY_QUESTIONS[lang]), IDENTITY_ANSWER[lang])])
        return [user(q), assistant(a)]  # tools offered, none needed: answered directly

    kinds, weights = zip(*EXCHANGE_KINDS)
    rows = []
    for _ in range(N_TOOL_ROWS):
        lang, n = rng.choice(["en", "zh"]), rng.choice(EXCHANGES)
        asked = rng.choices(kinds, weights, k=n)
        if rng.random() < 0.7:  # both tools offered (the model picks), in a random order
            names = list(COMPACT_TOOLS)
            rng.shuffle(names)
        else:  # only the one tool the row's questions need
            needed = rng.choice(list(COMPACT_TOOLS))
            names = [needed]
            asked = [k if k == "none" or (k == "calculator") == (needed == "calculator") else
                     ("calculator" if needed == "calculator" else "lookup") for k in asked]
        conversation = [tool_system(names, lang, rng)]
        for kind in asked:
            conversation += exchange(kind, lang)
        rows.append({"conversations": conversation})
    plain = build_sft(world, random.Random(rng.random()), n_rows=N_PLAIN_ROWS)  # chat without tools, as sft.jsonl
    rows = mix_in(rows, plain, rng)
    rng.shuffle(rows)
    heldout = []
    for i, e in enumerate(heldout_calc):
        lang = ("en", "zh")[i % 2]
        heldout.append({"question": calc_question(e, lang, rng), "answer": str(calculate(e)["result"]),
                        "lang": lang, "tools": ["calculator"], "kind": "arithmetic"})
    for fact in tool_world["heldout_facts"]:
        for lang in ("en", "zh"):
            for question in TEMPLATES[fact[0]][lang]["ask"]:
                heldout.append({"question": question.format(**fact_fields(fact, lang)),
                                "answer": fact_fields(fact, lang)["o"], "lang": lang, "tools": ["lookup"],
                                "kind": "lookup"})
    return {"facts": facts, "sft_tools": rows, "heldout_tools": heldout}


def tool_files(seed=SEED):
    """The tool files' texts, {name relative to the demo folder: text}; their own RNG stream."""
    built = build_tools(make_world(seed), random.Random(seed + 12))
    texts = {f"{name}.jsonl": "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in built[name])
             for name in ("sft_tools", "heldout_tools")}
    texts["facts.json"] = json.dumps(built["facts"], ensure_ascii=False, indent=1) + "\n"
    return texts


def bench_files(seed=SEED):
    """The bench files' texts, {path relative to the demo folder: text}; their own RNG stream."""
    return build_bench(make_world(seed), random.Random(seed + 8))


def main(out_dir="dataset/demo", seed=SEED, overwrite=False):
    """Write every file; a file that exists with other content (edited, or another --seed) is replaced
    only with overwrite=True. Files already identical are left as they are. Returns {name: path} of
    the .jsonl files; the bench's CSVs go to out_dir/bench/ (see bench_files)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {f"{name}.jsonl": "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
             for name, rows in build_all(seed).items()}
    texts.update(bench_files(seed))
    texts.update(tool_files(seed))
    paths = {rel: out_dir / rel for rel in texts}
    differ = [paths[n] for n in texts if paths[n].is_file() and paths[n].read_text(encoding="utf-8") != texts[n]]
    if differ and not overwrite:
        raise SystemExit(f"error: {', '.join(map(str, differ))} already exist with other content; pass "
                         f"--overwrite 1 to replace them, or --out_dir another folder")
    for rel, text in texts.items():
        if not (paths[rel].is_file() and paths[rel].read_text(encoding="utf-8") == text):
            paths[rel].parent.mkdir(parents=True, exist_ok=True)
            with open(paths[rel], "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
    return {rel[: -len(".jsonl")]: path for rel, path in paths.items() if rel.endswith(".jsonl")}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="dataset/demo", help="folder to write the .jsonl files into")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed; the default reproduces the shipped files")
    parser.add_argument("--overwrite", type=int, default=0,
                        help="1 = replace files that exist with other content (edited, or from another seed)")
    args = parser.parse_args()
    for name, path in main(args.out_dir, args.seed, bool(args.overwrite)).items():
        n_rows = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{path}: {n_rows} rows, {path.stat().st_size / 1e3:.0f} KB")
    bench = Path(args.out_dir) / "bench"
    print(f"{bench}/: {len(list(bench.glob('val/*.csv')))} subjects, "
          f"{sum(len(open(p, encoding='utf-8').readlines()) - 1 for p in bench.glob('val/*.csv'))} val questions "
          f"(dev: k-shot examples), C-Eval's CSV layout")
