"""Our tokenizer (tokenizer.bin, docs/FORMATS.md) as other programs spell it:
each token's text as llama.cpp's GGUF metadata and Hugging Face's
tokenizer.json write it, and the chat template as the Jinja they both run."""

import os

from convert.errors import ExportError
from convert.files import regular_file
from convert.tokenizers import (CHAT_CHATML, CHAT_LLAMA2, PIECE_CONTROL, PIECE_USER, TOK_BYTELEVEL,
                                TOK_SENTENCEPIECE, gpt2_bytes_to_unicode, read_tokenizer)

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


def chat_template_jinja(tok):
    """The Jinja chat template of a read_tokenizer() dict, or None when it has none."""
    if tok["chat_template"] == CHAT_LLAMA2:
        return _llama2_jinja(tok["system_prompt"])
    if tok["chat_template"] == CHAT_CHATML:
        return _chatml_jinja(tok["system_prompt"])
    return None


def load_tokenizer(path, vocab_size):
    """read_tokenizer() of path, checked to be a tokenizer of vocab_size tokens."""
    regular_file(path)
    try:
        tok = read_tokenizer(path)
    except ExportError as e:
        raise ExportError(path, "not a tokenizer.bin of export.py (LTOK version 1); "
                                "write one with export.py --tokenizer-model or beside a conversion") from e
    except Exception as e:      # struct.error, UnicodeDecodeError: a truncated or damaged file
        raise ExportError(path, f"a damaged tokenizer file ({type(e).__name__}: {e})") from None
    if len(tok["tokens"]) != vocab_size:
        raise ExportError(path, f"{len(tok['tokens'])} tokens but the model has {vocab_size}")
    if tok["kind"] not in (TOK_SENTENCEPIECE, TOK_BYTELEVEL):
        raise ExportError(path, f"tokenizer kind {tok['kind']}: expected sentencepiece (0) or byte-level (1)")
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
