"""`tunelab chat`: multi-turn chat with streaming, rendered by the same template code as training."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunelab.errors import UserError


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        # Checked here, before a model is loaded: transformers would fail later with a traceback (or, for
        # max_new_tokens 0, answer nothing at all).
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("num_beams", self.num_beams >= 1, "at least 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0: greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0: no top-k filtering)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1: none)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"chat: --{name.replace('_', '-')} (generation option {name}) must be {rule}, got "
                                f"{getattr(self, name)}")


class ChatSession:
    """A loaded model with its tokenizer and template; `reply` answers a list of messages."""

    def __init__(self, model, tokenizer, template, system: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.system = system
        self.stop_ids = template.stop_token_ids(tokenizer)

    @classmethod
    def load(cls, model: str, *, adapter: str | list[str] | None = None, template: str = "auto",
             system: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False):
        """`allow_pickle` / `trust_remote_code`: let pickle weights load / checkpoint code run (off: neither)."""
        from tunelab.data.templates import resolve_template
        from tunelab.infer.loading import load_for_inference

        m, tok = load_for_inference(model, adapter, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        return cls(m, tok, resolve_template(template, tok), system)

    # ---- several adapters: switch, stack, merge, unmerge (peft weight adapters)
    def adapters(self) -> list[str]:
        from tunelab.models.adapters import is_peft

        return list(self.model.peft_config) if is_peft(self.model) else []

    def use(self, names: list[str]) -> None:
        """Answer with these adapters only (one: switch; several: their updates add up)."""
        from tunelab.infer.loading import use_adapters

        if not self.adapters():
            raise UserError("no peft adapters are loaded")
        use_adapters(self.model, names)

    def merge(self) -> None:
        """Fold the active adapters into the weights (faster generation); `unmerge` restores them exactly."""
        if not self.adapters():
            raise UserError("no peft adapters are loaded")
        try:
            self.model.merge_adapter()
        except (AttributeError, ValueError, NotImplementedError) as e:
            raise UserError(f"this adapter cannot be merged: {str(e).splitlines()[0]}") from None

    def unmerge(self) -> None:
        if not self.adapters():
            raise UserError("no peft adapters are loaded")
        self.model.unmerge_adapter()

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        from tunelab.data.tokenize import encode_prompt

        return encode_prompt(messages, self.tokenizer, self.template, system=self.system)

    def reply(self, messages: list[dict[str, Any]], options: GenerationOptions,
              stream: Callable[[str], None] | None = None) -> str:
        import torch
        from transformers import GenerationConfig, TextStreamer

        ids = self.prompt_ids(messages)
        input_ids = torch.tensor([ids], device=self.model.device)
        gen = GenerationConfig(
            max_new_tokens=options.max_new_tokens,
            do_sample=options.do_sample,
            temperature=options.temperature if options.do_sample else None,
            top_p=options.top_p if options.do_sample else None,
            top_k=options.top_k if options.do_sample else None,
            repetition_penalty=options.repetition_penalty,
            num_beams=options.num_beams,
            length_penalty=options.length_penalty,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
        )
        streamer = None
        if stream is not None and options.num_beams == 1:
            outer = stream

            class _Streamer(TextStreamer):
                def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                    outer(text)

            streamer = _Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        torch.manual_seed(options.seed)
        with torch.no_grad(), warnings.catch_warnings():
            # generate passes position ids, which peft's prompt-learning models drop (they count soft prompts)
            warnings.filterwarnings("ignore", message="Position ids are not supported")
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      generation_config=gen, streamer=streamer)
        new = out[0, input_ids.shape[1]:].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        if stream is not None and streamer is None:
            stream(text)
        return text


def run_chat(*, model: str, adapter: str | list[str] | None, template: str, system: str | None, prompt: str | None,
             options: GenerationOptions, stream: bool, allow_pickle: bool = False,
             trust_remote_code: bool = False) -> int:
    session = ChatSession.load(model, adapter=adapter, template=template, system=system, allow_pickle=allow_pickle,
                               trust_remote_code=trust_remote_code)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if prompt is not None:
        answer = session.reply([{"role": "user", "content": prompt}], options, stream=write if stream else None)
        if not stream:
            write(answer)
        write("\n")
        return 0
    adapters = [adapter] if isinstance(adapter, str) else list(adapter or [])
    print(f"tunelab chat: {model}{''.join(' + ' + a for a in adapters)} (template {session.template.name}). "
          "Commands: /help lists them, /clear clears the history, /exit quits.", file=sys.stderr)
    history: list[dict[str, Any]] = []
    while True:
        try:
            line = input("user> ")
        except EOFError:
            write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("//"):  # a message that starts with "/": written "//..." so it is not a command
            text = text[1:]
        elif text.startswith("/"):
            action = _command(text, session)
            if action == "exit":
                return 0
            if action == "clear":
                history = []
                print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        write("assistant> ")
        answer = session.reply(history, options, stream=write if stream else None)
        if not stream:
            write(answer)
        write("\n")
        history.append({"role": "assistant", "content": answer})


_COMMANDS = {
    "/help": "list these commands",
    "/clear": "clear the conversation history (also /reset)",
    "/exit": "quit (also /quit, or Ctrl-D)",
}
_ADAPTER_COMMANDS = {
    "/adapters": "list the loaded adapters and the active ones",
    "/adapter A[,B]": "answer with adapter A (and B, stacked)",
    "/merge": "fold the active adapters into the weights (faster); /unmerge restores them",
}


def _command(text: str, session: ChatSession) -> str | None:
    """Run one slash command of interactive chat; never sends anything to the model. Returns "exit" or "clear"
    when the chat loop has to act, else None (the command printed its answer, or an error, on stderr)."""
    name = text.split(None, 1)[0]
    if name in ("/exit", "/quit"):
        return "exit"
    if name in ("/clear", "/reset"):
        return "clear"
    if name == "/help":
        commands = {**_COMMANDS, **(_ADAPTER_COMMANDS if session.adapters() else {})}
        width = max(len(c) for c in commands)
        lines = [f"  {c.ljust(width)}  {h}" for c, h in commands.items()]
        lines.append("  start a message with // to send a line that begins with / (//etc -> /etc)")
        print("commands:\n" + "\n".join(lines), file=sys.stderr)
        return None
    if name in ("/adapters", "/adapter", "/merge", "/unmerge"):
        try:
            if text == "/adapters":
                print("adapters: " + ", ".join(session.adapters()) + "; active: "
                      + ", ".join(session.model.active_adapters), file=sys.stderr)
            elif name == "/adapter" and len(text.split(None, 1)) == 2:
                session.use([n.strip() for n in text.split(None, 1)[1].split(",") if n.strip()])
                print(f"(using {', '.join(session.model.active_adapters)})", file=sys.stderr)
            elif text == "/merge":
                session.merge()
                print("(adapters merged into the weights)", file=sys.stderr)
            elif text == "/unmerge":
                session.unmerge()
                print("(adapters unmerged)", file=sys.stderr)
            else:
                print("usage: /adapters | /adapter NAME[,NAME] | /merge | /unmerge", file=sys.stderr)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
        return None
    print(f"error: unknown command {name}; /help lists the commands (start with // to send a line beginning "
          "with / to the model)", file=sys.stderr)
    return None
