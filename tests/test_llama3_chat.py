"""Llama 3's chat template, against transformers' apply_chat_template.

No Llama 3 tokenizer file is at hand, so one is built here with the
`tokenizers` library the way Llama 3's is made: byte-level BPE behind Llama
3's Split regex, <|begin_of_text|> put first by the post-processor, and the
special tokens <|begin_of_text|>, <|end_of_text|>, <|start_header_id|>,
<|end_header_id|> and <|eot_id|>; its tokenizer_config.json carries Llama 3
Instruct's chat template (written out below). export.py --tokenizer-from
converts the directory, and:

  - ./run -m chat --tokenize's ids equal apply_chat_template(...,
    add_generation_prompt=True)'s, with and without a system prompt, with
    whitespace that the template trims, and with --template llama3 chosen
    by hand;
  - a two-turn chat with a model built to answer "Hello world" and then
    <|eot_id|> (a bigram model: nothing but the embedding reaches the
    classifier, whose rows are set to chain the answer's tokens) stops at
    <|eot_id|> each time (its eos is <|end_of_text|>), and every position
    ./run computed has the logits the reference model (model.py) gives over
    apply_chat_template's ids for the whole conversation.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import test_tokenizer as tt     # its corpus

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import export  # noqa: E402
from test_all import assert_logits_close  # noqa: E402

import transformers  # noqa: E402

RUN = Path(os.environ.get("RUN_BINARY", ROOT / "run"))

# Llama 3 Instruct's chat template: each message's header, its content
# trimmed, <|eot_id|>; bos_token before the first; the assistant's header
# last when a generation prompt is asked for.
LLAMA3_TEMPLATE = (
    r"{% set loop_messages = messages %}{% for message in loop_messages %}"
    r"{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    r"message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    r"{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    r"{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
ANSWER = "Hello world"


@pytest.fixture(scope="module", autouse=True)
def build():
    if "RUN_BINARY" not in os.environ:
        subprocess.run(["make", "-s", "run"], cwd=ROOT, check=True)


def run(args, check=True, **kw):
    p = subprocess.run([str(RUN)] + [str(a) for a in args], capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"./run {' '.join(map(str, args))} exited {p.returncode}: {p.stderr}")
    return p


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """(transformers tokenizer, directory holding it and tokenizer.bin converted from it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    d = tmp_path_factory.mktemp("llama3")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(export.LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = tt.corpus(2000, seed=9, scripts=("latin", "greek")) + [
        "Hello world, what is the capital of France?\n\nYou are a helpful assistant."] * 20
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_special_tokens(SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}))
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), d / "tokenizer.bin", "--tokenizer-from", d],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return transformers.AutoTokenizer.from_pretrained(str(d)), d


def chat_ids(tokenizer_bin, question, system=None, extra=()):
    p = run(["--tokenize", "-m", "chat", "-z", tokenizer_bin, "-i", question, *extra]
            + (["-y", system] if system is not None else []))
    return [int(x) for x in p.stdout.split()]


def messages(question, system=None):
    return ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": question}]


QUESTIONS = [("What is the capital of France?", None),
             ("What is the capital of France?", "You are a helpful assistant."),
             ("  Hello\n\n world  \n", " \t Be brief.\u3000"),
             ("\u00a0naïve café — ünïcödé 😀\u2028", "αβγ\n"),
             ("<|eot_id|> is typed, and 12345.", None),
             ("x", " ")]


@pytest.mark.parametrize("question,system", QUESTIONS)
def test_chat_prompt_matches_apply_chat_template(llama3, question, system):
    hf, d = llama3
    assert export.read_tokenizer(d / "tokenizer.bin")["chat_template"] == export.CHAT_LLAMA3
    expected = hf.apply_chat_template(messages(question, system), add_generation_prompt=True)
    assert chat_ids(d / "tokenizer.bin", question, system) == expected


def test_template_llama3_by_hand(llama3, tmp_path):
    """--template llama3 on a tokenizer file that names no template."""
    hf, d = llama3
    tok = export.read_tokenizer(d / "tokenizer.bin")
    export.write_tokenizer(tmp_path / "plain.bin", tok["kind"], tok["tokens"], bos_id=tok["bos_id"],
                           eos_id=tok["eos_id"], flags=tok["flags"], pretokenizer=tok["pretokenizer"],
                           merges=tok["merges"])
    question, system = QUESTIONS[1]
    expected = hf.apply_chat_template(messages(question, system), add_generation_prompt=True)
    assert chat_ids(tmp_path / "plain.bin", question, system) != expected      # Llama 2's [INST]
    assert chat_ids(tmp_path / "plain.bin", question, system, ["--template", "llama3"]) == expected
    p = run(["--tokenize", "-m", "chat", "-z", tmp_path / "plain.bin", "-i", "x", "--template", "llama4"], check=False)
    assert p.returncode == 2 and "llama2, chatml or llama3" in p.stderr


def test_template_recognised():
    assert export.gguf_chat_template(LLAMA3_TEMPLATE) == (export.CHAT_LLAMA3, "")


# Llama 3.1 / 3.2 Instruct's templates, written for this test with their
# structure (tools left out, their markers kept): bos_token; a system turn
# always, its text "Cutting Knowledge Date: December 2023", "Today Date: "
# and the date, then the system message trimmed (or nothing); each message
# as in Llama 3's. 3.1's date is 26 Jul 2024; 3.2's today's, where the
# renderer has strftime_now.
def llama31_template(date):
    return (
        "{{- bos_token }}\n"
        "{%- if not date_string is defined %}" + date + "{%- endif %}\n"
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {%- set system_message = messages[0]['content']|trim %}\n"
        "    {%- set messages = messages[1:] %}\n"
        "{%- else %}{%- set system_message = '' %}{%- endif %}\n"
        "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}\n"
        "{%- if tools is defined and tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}\n"
        "{{- 'Cutting Knowledge Date: December 2023\\n' }}\n"
        "{{- 'Today Date: ' + date_string + '\\n\\n' }}\n"
        "{{- system_message }}{{- '<|eot_id|>' }}\n"
        "{%- for message in messages %}\n"
        "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
        "message['content'] | trim + '<|eot_id|>' }}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n")


LLAMA31_TEMPLATE = llama31_template("{%- set date_string = '26 Jul 2024' %}")
LLAMA32_TEMPLATE = llama31_template("{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
                                    "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}")


@pytest.mark.parametrize("template,kind", [(LLAMA31_TEMPLATE, export.CHAT_LLAMA31),
                                           (LLAMA32_TEMPLATE, export.CHAT_LLAMA32)], ids=["3.1", "3.2"])
@pytest.mark.parametrize("question,system", QUESTIONS[:4])
def test_dated_preamble_matches_apply_chat_template(llama3, tmp_path, template, kind, question, system):
    """Llama 3.1 / 3.2's system turn, dated as apply_chat_template dates it."""
    _, d = llama3
    shutil.copy(d / "tokenizer.json", tmp_path)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    export.write_tokenizer_hf_json(str(tmp_path / "tokenizer.json"), str(tmp_path / "t.bin"))
    assert export.read_tokenizer(tmp_path / "t.bin")["chat_template"] == kind
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    expected = hf.apply_chat_template(messages(question, system), add_generation_prompt=True)
    assert "Today Date" in hf.decode(expected)
    assert chat_ids(tmp_path / "t.bin", question, system) == expected


CHATML_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.mark.parametrize("where,kind", [("list", export.CHAT_CHATML), ("jinja", export.CHAT_CHATML),
                                        ("vocabulary", export.CHAT_LLAMA3)])
def test_template_found_beside_tokenizer_json(llama3, tmp_path, where, kind):
    """Where a Hugging Face tokenizer keeps its template: tokenizer_config.json's
    chat_template as a list of named templates ("default" is used), a
    chat_template.jinja file beside it, or none (the marker tokens decide)."""
    _, d = llama3
    shutil.copy(d / "tokenizer.json", tmp_path)
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["chat_template"]
    if where == "list":
        config["chat_template"] = [{"name": "tool_use", "template": LLAMA3_TEMPLATE},
                                   {"name": "default", "template": CHATML_TEMPLATE}]
    elif where == "jinja":
        (tmp_path / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    export.write_tokenizer_hf_json(str(tmp_path / "tokenizer.json"), str(tmp_path / "t.bin"))
    assert export.read_tokenizer(tmp_path / "t.bin")["chat_template"] == kind


def bigram_model(path, vocab_size, chain, seed=0):
    """A checkpoint whose greedy next token depends on the current one
    alone, following chain {token: next token}: attention and MLP add
    nothing to the residual stream, and the classifier row of each next
    token points along its predecessor's embedding. Returns the reference model."""
    args = export.ModelArgs(dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16,
                            vocab_size=vocab_size, max_seq_len=512)
    model = export.random_model(args, seed)
    state = model.state_dict()
    state["layers.0.attention.wo.weight"].zero_()
    state["layers.0.feed_forward.w2.weight"].zero_()
    embedding, output = state["tok_embeddings.weight"], state["output.weight"]
    output.mul_(0.5)
    for token, following in chain.items():
        output[following] += 5 * embedding[token] / embedding[token].norm()
    model.load_state_dict(state)
    export.write_checkpoint(path, args, state)
    return model


def test_two_turns_stop_at_eot_and_match_the_reference(llama3, tmp_path):
    hf, d = llama3
    eot = hf.convert_tokens_to_ids("<|eot_id|>")
    assert hf.eos_token_id != eot
    answer = hf.encode(ANSWER, add_special_tokens=False)
    header_end = hf.apply_chat_template(messages("q"), add_generation_prompt=True)[-1]   # "\n\n"
    path = [header_end] + answer + [eot]
    assert len(set(path)) == len(path), path
    chain = dict(zip(path, path[1:]))
    chain[eot] = answer[0]                 # were <|eot_id|> not a stop, the answer would go on
    model = bigram_model(tmp_path / "model.bin", len(hf), chain)

    questions, system = ["What is the capital of France?", "  And of Germany? "], "Be brief."
    p = run([tmp_path / "model.bin", "-z", d / "tokenizer.bin", "-m", "chat", "-t", 0, "-n", 20, "-y", system,
             "--logits", tmp_path / "logits.bin"], input="\n".join(questions) + "\n")
    assert p.stdout == f"{ANSWER}\n{ANSWER}\n", p.stdout

    conversation = messages(questions[0], system) + [{"role": "assistant", "content": ANSWER},
                                                     {"role": "user", "content": questions[1]}]
    ids = hf.apply_chat_template(conversation, add_generation_prompt=True) + answer
    ours = np.fromfile(tmp_path / "logits.bin", dtype="<f4").reshape(-1, len(hf))
    assert len(ours) == len(ids)
    with torch.no_grad():
        theirs = model(torch.tensor([ids]))[0].numpy()
    assert_logits_close(ours, theirs)


def test_tokenizer_from_a_tokenizer_json(llama3, tmp_path):
    """--tokenizer-from the tokenizer.json itself: the ids of transformers."""
    hf, d = llama3
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), tmp_path / "t.bin", "--tokenizer-from",
                        d / "tokenizer.json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    for text in ["Hello world, what is the capital of France?", "  naïve\n\n\tcafé 12345 "]:
        assert [int(x) for x in run(["--tokenize", "-z", tmp_path / "t.bin", "-i", text]).stdout.split()] == \
            hf.encode(text), text
