#!/usr/bin/env python3
"""Make the tokenizer parity fixtures in tests/fixtures/tokenizer/.

Trains two small byte-level BPE tokenizers with HF `tokenizers` on a built-in corpus and records
the ids HF gives for a test corpus, so tests/test_tokenizer.cpp can check that ranktune's BPE
gives exactly the same ids without needing Python in CI:

  llama3/tokenizer.json  Llama 3's pre-tokenizer (Split on its regex, then ByteLevel without
                         regex), ignore_merges=true, Llama 3's special tokens appended after the
                         learned vocabulary, a TemplateProcessing post-processor that adds
                         <|begin_of_text|> (which encode() must NOT apply), merges in the
                         [a, b] pair form.
  gpt2/tokenizer.json    GPT-2's ByteLevel pre-tokenizer (GPT-2 regex), <|endoftext|>, a few
                         added tokens exercising lstrip / rstrip / single_word / non-special
                         (normalized) matching, merges rewritten to the legacy "a b" string form.
  corpus.txt             UTF-8 test lines (Unicode scripts, combining marks, whitespace runs,
                         numbers, code, contractions, emoji ZWJ sequences and flags, inline
                         special tokens).
  expected_ids.json      For every case (each corpus line, extra cases that a line cannot hold
                         such as "\\r\\n" and blank-line runs, and the whole corpus as one
                         text): HF's ids (add_special_tokens=False, i.e. no BOS) and HF's decode
                         (skip_special_tokens=False) per tokenizer, plus decodes of id prefixes
                         that cut multi-byte characters (HF replaces invalid UTF-8 by U+FFFD).
                         "gpt2_prefix_space" is gpt2/tokenizer.json with the pre-tokenizer's
                         add_prefix_space set to true (the test patches the JSON the same way).

Usage (the outputs are committed; rerun only to change them):
  pip install tokenizers
  python3 tools/make_tokenizer_fixtures.py [--out tests/fixtures/tokenizer]
"""
import argparse
import json
import os
import random

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
import tokenizers

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                   "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]

# ---- training corpus: fixed paragraphs plus seeded sentences from word lists ----------------
TRAIN_PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. It's what they'd said they'll do, and we've seen it.",
    "Training a language model means predicting the next token; the loss is the cross entropy.",
    "We're going to fine-tune the model with low-rank adapters, and I'm sure you'll like it.",
    "Die Straße ist naß, aber die Bäume blühen schön. Über alle Gipfel ist Ruh.",
    "Le café est très chaud ; l'été dernier, nous étions à Paris. Où est la bibliothèque ?",
    "El niño comió una manzana. ¿Dónde está la estación? ¡Qué día tan bonito!",
    "Москва — столица России. Привет, как дела? Всё хорошо, спасибо.",
    "東京は日本の首都です。今日はいい天気ですね。我们正在训练一个语言模型。机器学习很有趣。",
    "서울은 한국의 수도입니다. 안녕하세요, 만나서 반갑습니다.",
    "مرحبا بالعالم. اللغة العربية جميلة جدا. كيف حالك اليوم؟",
    "שלום עולם. ‏עברית נכתבת מימין לשמאל.",
    "Ελληνικά: Καλημέρα κόσμε, τι κάνεις;",
    "हिन्दी एक सुंदर भाषा है। नमस्ते दुनिया।",
    "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    "def forward(self, x):\n    h = self.norm(x)\n    return x + self.attn(h)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\n",
    "if __name__ == \"__main__\":\n\tmain(sys.argv[1:])\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "The year 2024 had 366 days; pi is 3.14159265358979 and e is 2.718281828.",
    "Call +1 (555) 123-4567 or email someone@example.com before 10:30am.",
    "Emoji: 😀 😃 😄 👍🏽 ❤️ 🎉 🚀 👨‍👩‍👧‍👦 🇫🇷 🇯🇵",
    "Zalgo-ish: é (e + combining acute), ñ, ǹ, a\u0301\u0302\u0303.",
    "Tabs\tand  double  spaces   and    more.\n\n\nAnd blank lines.",
]
WORDS = ("the of and to in is was for on that with as by at from it this be are or an have not but "
         "model token train data loss rank adapter layer attention weight gradient batch epoch step "
         "learning rate optimizer checkpoint dataset shard tensor kernel memory device stream "
         "language text word sentence paragraph document system user assistant reply answer "
         "question about which their there would could should people time year day way thing "
         "Hello World Llama Python CUDA GPU CPU MPI NCCL HDF5 JSON YAML").split()
FOREIGN = ("café naïve résumé façade Zürich São Paulo Kraków Ærø smörgåsbord crème brûlée "
           "日本語 中文 한국어 العربية Русский Ελληνικά עברית हिन्दी").split()


def training_corpus():
    rng = random.Random(1234)
    lines = list(TRAIN_PARAGRAPHS) * 3
    for _ in range(1500):
        n = rng.randint(4, 14)
        words = []
        for _ in range(n):
            r = rng.random()
            if r < 0.75:
                w = rng.choice(WORDS)
            elif r < 0.85:
                w = rng.choice(FOREIGN)
            elif r < 0.95:
                w = str(rng.randint(0, 10 ** rng.randint(1, 7)))
            else:
                w = rng.choice(["(", ")", ",", ";", ":", "->", "==", "+=", "\"", "'s", "'t", "n't"])
            if rng.random() < 0.1:
                w = w.capitalize()
            words.append(w)
        sep = rng.choice([" ", " ", " ", "  ", "\t", "\n"])
        lines.append(sep.join(words) + rng.choice([".", "!", "?", "", "\n"]))
    return lines


# ---- test corpus --------------------------------------------------------------------------
CORPUS_LINES = [
    "Hello world",
    "Hello, World! HELLO WORLD hello world",
    "I'M sure it's fine, but THEY'LL say WE'VE done it; you'd, I'd, she'S, It'Ll.",
    "don't can't won't isn't 'tis 's 'S ''s",
    "The quick brown fox jumps over the lazy dog.",
    "Training a language model with low-rank adapters.",
    "Die Straße ist naß; Über Bäume, schön!",
    "Le café est très chaud ; l'été à Paris. Où ?",
    "¿Dónde está la estación? ¡Qué día!",
    "Москва — столица России.",
    "東京は日本の首都です。我们正在训练一个语言模型。",
    "서울은 한국의 수도입니다.",
    "مرحبا بالعالم، كيف حالك؟ ١٢٣ ٤٥٦",
    "שלום עולם",
    "Καλημέρα κόσμε",
    "नमस्ते दुनिया। हिन्दी",
    "ภาษาไทยไม่มีการเว้นวรรค",
    "combining: e\u0301 a\u0301\u0302\u0303 n\u0303 Z\u0351\u0352\u0353alg\u0300o",
    "nfc vs nfd: \u00e9 e\u0301 \u00c5 A\u030a",
    "tabs\there\t\tand\t\t\tmore",
    "double  spaces   and    runs     of      them",
    "trailing spaces   ",
    "   leading spaces",
    " ",
    "\t",
    "mixed \t \t whitespace\t \tend",
    "non-breaking\u00a0space and\u2003em space and\u3000ideographic and\u200bzero width",
    "mongolian\u180evowel sep, ogham\u1680space, \u001cfile sep, \u000bvtab, \u000cform feed",
    "digits 0 12 345 6789 1234567890 3.14159 1,000,000 1e-10 0x1F",
    "long number 12345678901234567890123456789",
    "٣٤٥ ໒໓ 一二三 ①②③ ½ ²³",
    "def forward(self, x):    return x + self.attn(self.norm(x))",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "if x == 1 && y != 2 || !z: print(f\"{x!r:>10}\")",
    "std::vector<int32_t> ids = tok->encode(\"hi\"); // comment",
    "<html><body class=\"x\">&amp;&lt;&gt;</body></html>",
    "path/to/file.txt C:\\Windows\\System32 ~/.bashrc",
    "email someone@example.com url https://example.com/a?b=c&d=e#f",
    "punctuation!!! ??? ... --- ___ *** ### @@@ $$$ %%% ^^^",
    "quotes 'single' \"double\" `back` «guillemets» „low“ ‘curly’",
    "Emoji 😀😃😄 👍🏽 ❤️ 🎉🚀",
    "ZWJ family 👨‍👩‍👧‍👦 and 👩🏽‍💻 and 🏳️‍🌈",
    "flags 🇫🇷🇯🇵🇺🇸 and 🏴󠁧󠁢󠁳󠁣󠁴󠁿",
    "math ∀x∈ℝ: x² ≥ 0 ∑ ∫ √ ∞ ≠ ≈",
    "<|begin_of_text|>Hello<|eot_id|>",
    "<|start_header_id|>user<|end_header_id|>\\n\\nHi there!<|eot_id|><|start_header_id|>assistant<|end_header_id|>",
    "text <|eot_id|> spaced <|end_of_text|>",
    "almost special <|eot_id| and <eot_id|> and <|EOT_ID|>",
    "<|endoftext|>GPT-2 separator<|endoftext|> again",
    "fill <mask> here and   <mask>there",
    "strip<rs>   right and <rs>\tend",
    "ranktune rocks, (ranktune) ok, xranktune no, ranktuneX no, ranktune",
    "single_word edges: ranktune_x ranktune½ e\u0303ranktune ranktune\u200dz ٣ranktune ranktune",
    "UPPER lower MiXeD CamelCase snake_case kebab-case SCREAMING_CASE",
    "a",
    "ab",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "the the the the the the the the",
    "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬…æ",
    "\u00ad soft hyphen, \ufeff BOM, \u2028 line sep, \u0085 next line",
    "ſ long s and K Kelvin and ß sharp; it'ſ and IT'S and it'K",
]

EXTRA_CASES = [
    "",
    "\n",
    "\n\n\n",
    "line one\nline two\n\n\nline five\n",
    "windows\r\nline\r\nends\r\n",
    "lone\rcarriage return",
    "spaces before newline   \n   and after",
    "   \n\t\n  \n",
    "code:\n\tif x:\n\t\treturn 1\n    else:\n        return 2\n",
    "<|eot_id|>\n\n<|start_header_id|>",
    "trailing newline after special<|eot_id|>\n",
]

PARTIAL_DECODE_LINES = ["Emoji 😀😃😄 👍🏽 ❤️ 🎉🚀", "東京は日本の首都です。我们正在训练一个语言模型。",
                        "combining: e\u0301 a\u0301\u0302\u0303 n\u0303 Z\u0351\u0352\u0353alg\u0300o"]


def train_llama3(corpus):
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(LLAMA3_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos)])
    return tok


def train_gpt2(corpus):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=1200, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(["<|endoftext|>",
                            AddedToken("<mask>", lstrip=True, special=True),
                            AddedToken("<rs>", rstrip=True, special=True)])
    tok.add_tokens([AddedToken("ranktune", single_word=True)])  # non-special: normalized=True
    return tok


def legacy_merges(path):
    """Rewrite a tokenizer.json's merges from [a, b] pairs to the legacy "a b" strings."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    merges = data["model"]["merges"]
    if merges and isinstance(merges[0], list):
        data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)


def record(tok, cases):
    ids = [tok.encode(text, add_special_tokens=False).ids for text in cases]
    decoded = [tok.decode(i, skip_special_tokens=False) for i in ids]
    partial = []
    for line in PARTIAL_DECODE_LINES:
        full = tok.encode(line, add_special_tokens=False).ids
        for k in range(1, len(full) + 1):
            partial.append({"ids": full[:k], "text": tok.decode(full[:k], skip_special_tokens=False)})
    return {"ids": ids, "decoded": decoded, "partial_decodes": partial}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "tokenizer"))
    args = parser.parse_args()

    corpus = training_corpus()
    for name, train in (("llama3", train_llama3), ("gpt2", train_gpt2)):
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        path = os.path.join(args.out, name, "tokenizer.json")
        train(corpus).save(path, pretty=False)
        if name == "gpt2":
            legacy_merges(path)

    for line in CORPUS_LINES:
        assert "\n" not in line and "\r" not in line, line
    corpus_text = "\n".join(CORPUS_LINES) + "\n"
    with open(os.path.join(args.out, "corpus.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(corpus_text)
    cases = CORPUS_LINES + EXTRA_CASES + [corpus_text]

    out = {
        "generated_by": "tools/make_tokenizer_fixtures.py",
        "tokenizers_version": tokenizers.__version__,
        "corpus_lines": len(CORPUS_LINES),
        "cases": cases,
        "tokenizers": {},
    }
    for name in ("llama3", "gpt2"):
        tok = Tokenizer.from_file(os.path.join(args.out, name, "tokenizer.json"))
        out["tokenizers"][name] = {"file": f"{name}/tokenizer.json", **record(tok, cases)}
    # The same gpt2 file with add_prefix_space=true: every piece between added tokens gets a space.
    with open(os.path.join(args.out, "gpt2", "tokenizer.json"), encoding="utf-8") as f:
        patched = json.load(f)
    patched["pre_tokenizer"]["add_prefix_space"] = True
    tok = Tokenizer.from_str(json.dumps(patched))
    out["tokenizers"]["gpt2_prefix_space"] = {
        "file": "gpt2/tokenizer.json", "patch": {"pre_tokenizer.add_prefix_space": True}, **record(tok, cases)}

    with open(os.path.join(args.out, "expected_ids.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    with open(os.path.join(args.out, ".gitattributes"), "w", encoding="utf-8") as f:
        f.write("# Byte-exact fixtures: no end-of-line conversion.\n* -text\n")
    total = sum(os.path.getsize(os.path.join(d, fn)) for d, _, fns in os.walk(args.out) for fn in fns)
    print(f"wrote {args.out} ({total / 1024:.0f} KiB), tokenizers {tokenizers.__version__}")


if __name__ == "__main__":
    main()
