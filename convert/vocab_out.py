"""Our tokenizer (tokenizer.bin, docs/FORMATS.md) as other programs spell it:
each token's text as llama.cpp's GGUF metadata and Hugging Face's
tokenizer.json write it, and the chat template as the Jinja they both run."""

import os

from convert.errors import ExportError
from convert.tokenizers import (CHAT_CHATML, CHAT_LLAMA2, CHAT_LLAMA3, CHAT_LLAMA31, CHAT_LLAMA32, PIECE_CONTROL,
                                PIECE_USER, TOK_BYTELEVEL, TOK_SENTENCEPIECE, gpt2_bytes_to_unicode, read_tokenizer)

# The chat templates run.c implements (see chat in run.c), in Jinja, with
# the default system prompt of the tokenizer file, if any, where the template
# takes it when a conversation brings none. transformers' apply_chat_template
# and llama.cpp render them; the tokens are those of ./run -m chat.

def _jinja_literal(text):
    """text as the body of a single-quoted Jinja string."""
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def _llama2_jinja(default_system):
    """Llama 2's [INST] template; default_system ("" for none) when no system message comes."""
    return ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
            "{% set messages = messages[1:] %}"
            f"{{% else %}}{{% set system = '{_jinja_literal(default_system)}' %}}{{% endif %}}"
            "{% for message in messages %}"
            "{% if message['role'] == 'user' %}"
            "{% if loop.first and system %}{{ bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + "
            "message['content'] + ' [/INST]' }}"
            "{% else %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
            "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
            "{% endfor %}")


def _chatml_jinja(default_system):
    """ChatML; default_system ("" for none) is written as a literal system turn,
    where the template takes it when a conversation brings none."""
    first = ""
    if default_system:
        first = ("{% if loop.first and messages[0]['role'] != 'system' %}"
                 f"{{{{ '<|im_start|>system\\n{_jinja_literal(default_system)}<|im_end|>\\n' }}}}{{% endif %}}")
    return ("{% for message in messages %}" + first +
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _llama3_jinja(default_system):
    """Llama 3's headers: bos_token, then each message as <|start_header_id|>role
    <|end_header_id|>, a blank line, its content trimmed and <|eot_id|> (an
    empty system message left out, as ./run does); default_system ("" for
    none) as the system message when none comes."""
    first = ""
    if default_system:
        first = ("{% if messages[0]['role'] != 'system' %}{% set messages = "
                 f"[{{'role': 'system', 'content': '{_jinja_literal(default_system)}'}}] + messages %}}{{% endif %}}")
    return (first + "{% if bos_token %}{{ bos_token }}{% endif %}{% for message in messages %}"
            "{% if message['role'] != 'system' or message['content'] %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
            "'<|eot_id|>' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def _llama31_jinja(default_system, dated_today):
    """Llama 3.1 / 3.2's headers: as Llama 3's, but a system turn always comes
    first, its text the dated preamble and then the system message (or
    default_system); dated today by strftime_now where the renderer has it
    and dated_today, else 26 Jul 2024, as their templates date it."""
    date = ("{% if strftime_now is defined %}{% set date = strftime_now('%d %b %Y') %}"
            "{% else %}{% set date = '26 Jul 2024' %}{% endif %}" if dated_today else
            "{% set date = '26 Jul 2024' %}")
    return ("{% if bos_token %}{{ bos_token }}{% endif %}"
            "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
            f"{{% set messages = messages[1:] %}}{{% else %}}{{% set system = '{_jinja_literal(default_system)}' %}}"
            "{% endif %}" + date +
            "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
            "Today Date: ' + date + '\n\n' + system + '<|eot_id|>' }}"
            "{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
            "'<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def chat_template_jinja(tok):
    """The Jinja chat template of a read_tokenizer() dict, or None when it has none."""
    if tok["chat_template"] == CHAT_LLAMA2:
        return _llama2_jinja(tok["system_prompt"])
    if tok["chat_template"] == CHAT_CHATML:
        return _chatml_jinja(tok["system_prompt"])
    if tok["chat_template"] == CHAT_LLAMA3:
        return _llama3_jinja(tok["system_prompt"])
    if tok["chat_template"] in (CHAT_LLAMA31, CHAT_LLAMA32):
        return _llama31_jinja(tok["system_prompt"], tok["chat_template"] == CHAT_LLAMA32)
    return None


def load_tokenizer(path, vocab_size):
    """read_tokenizer() of path, checked to be a tokenizer of vocab_size tokens."""
    tok = read_tokenizer(path)
    if len(tok["tokens"]) != vocab_size:
        raise ExportError(path, f"{len(tok['tokens'])} tokens but the model has {vocab_size}")
    return tok


def token_texts(tok, path):
    """Each token's text as GGUF and tokenizer.json vocabularies hold it:
    sentencepiece pieces as they are ("▁" for a space, byte tokens "<0xXX>"),
    byte-level tokens in GPT-2's byte alphabet, except the added ones
    (control and user-defined), which are their own text."""
    alphabet = gpt2_bytes_to_unicode()
    texts = []
    for i, (data, _, kind) in enumerate(tok["tokens"]):
        if tok["kind"] == TOK_BYTELEVEL and kind not in (PIECE_CONTROL, PIECE_USER):
            texts.append("".join(alphabet[b] for b in data))
            continue
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ExportError(path, f"token {i} {data!r} is not UTF-8 text, which GGUF and "
                                    "tokenizer.json need") from None
    return texts


def default_tokenizer(model_path):
    """tokenizer.bin beside the checkpoint model_path."""
    return os.path.join(os.path.dirname(os.path.abspath(model_path)), "tokenizer.bin")
