"""Tools a model calls while it reasons (ReTool, Feng et al. 2025; R1-Searcher++): the model writes a call,
decoding of that row pauses, the tool runs, its output is spliced into the row as forced tokens, and
decoding resumes. rollout.generate(..., tools=Tools(...)) runs the loop; this file says what a call looks
like and runs the tools.

    <c>37*48+15</c><o>1791</o><answer>1791</answer>
    ^ model-written ^ spliced: never trained on (loss_mask 0)

A tool is a function f(call_text) -> str. Built in:
    calculator  the project's bounded exact evaluator (rewards.safe_eval): + - * / ** ( ); no process
    python      the call is a Python program, run in sandbox.py (every containment code_reward has);
                its stdout (or the last line of its error) is the output
and your own as module:function, named on the command line like a reward function (--tools mine:lookup).

Limits (ToolSpec): calls per completion, seconds per call, output tokens per call (a longer output is cut
and ends with a marker). A call that raises or runs out of time returns "error: ..." as its output (the
model sees it, as ReTool's interpreter feedback), and is counted. The delimiters are configurable so a
real chat template's tool syntax can be used (e.g. ReTool's ```python ... ``` answered by <interpreter>).
"""
import importlib
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from fractions import Fraction

import rewards


@dataclass(frozen=True)
class ToolSpec:
    call_start: str = "<c>"       # short: the built-in tokenizer spells them character by character
    call_end: str = "</c>"
    output_start: str = "<o>"
    output_end: str = "</o>"
    max_calls: int = 4            # per completion; later calls get no output (counted: tools/over_limit)
    timeout: float = 5.0          # seconds per call
    max_output_tokens: int = 24   # per call, delimiters included; a longer output is cut and ends with CUT
    workers: int = 8              # calls of one decode step run in parallel on this many threads


CUT = "..."


def calculator(call):
    """The exact value of an arithmetic expression (integers print as integers, other fractions as decimals
    to 6 places), or an error line."""
    v = rewards.safe_eval(call)
    if v is None:
        return "error: not an arithmetic expression"
    v = Fraction(v)
    return str(v.numerator) if v.denominator == 1 else f"{float(v):.6g}"


def python(call, timeout=5.0):
    """Run the call as a Python program in the sandbox; its stdout, or the last line of its stderr."""
    import sandbox
    r = sandbox.default_sandbox().run(call, timeout=timeout)
    if r.timed_out:
        return f"error: timed out after {timeout:g} s"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["exit code %d" % r.returncode])[-1]
        return f"error: {last}"
    return r.stdout.strip()


TOOLS = {"calculator": calculator, "python": python}


def spec_from(cfg):
    """A script's tool flags -> ToolSpec. --tool-format is "CALL_START,CALL_END,OUTPUT_START,OUTPUT_END"."""
    parts = cfg.tool_format.split(",")
    if len(parts) != 4 or not all(parts):
        raise ValueError(f"--tool-format must be four non-empty delimiters separated by commas, got {cfg.tool_format!r}")
    return ToolSpec(*parts, max_calls=cfg.max_tool_calls, timeout=cfg.tool_timeout,
                    max_output_tokens=cfg.max_tool_output_tokens)


def checks(cfg):
    """The tool flags (grpo.py, sft.py and evaluate.py share them)."""
    try:
        spec_from(cfg)
        cfg.tools and resolve(cfg.tools)
        problem = None
    except ValueError as e:
        problem = str(e)
    return [(problem is None, problem),
            (cfg.max_tool_calls >= 0, f"--max-tool-calls must be >= 0, got {cfg.max_tool_calls}"),
            (cfg.tool_timeout > 0, f"--tool-timeout must be > 0, got {cfg.tool_timeout}"),
            (cfg.max_tool_output_tokens >= 8, f"--max-tool-output-tokens must be >= 8, got {cfg.max_tool_output_tokens}")]


def build(cfg, tok):
    """The run's Tools from its flags, or None without --tools."""
    return Tools(resolve(cfg.tools), spec_from(cfg), tok) if cfg.tools else None


def output_mask(tok, ids, spec):
    """(len(ids),) list of 0/1: 0 on every spliced output (output_start ... output_end, as Tools.output_ids
    tokenises it) inside a completion's token ids, 1 elsewhere: SFT on tool traces learns the calls and what
    follows the outputs, never the outputs. A trace whose output spans do not tokenise as the rollout
    splices them raises (the model would be trained on a layout it never sees)."""
    text = tok.decode(ids)
    mask, pos, start = [1] * len(ids), 0, 0
    enc = lambda t: tok(t, add_special_tokens=False, split_special_tokens=True).input_ids
    while True:
        a = text.find(spec.output_start, start)
        if a < 0:
            return mask
        b = text.find(spec.output_end, a)
        if b < 0:
            raise ValueError(f"a tool output opened with {spec.output_start!r} is never closed")
        span = enc(text[a:b + len(spec.output_end)])
        at = next((i for i in range(pos, len(ids) - len(span) + 1) if ids[i:i + len(span)] == span), None)
        if at is None:
            raise ValueError(f"the tool output {text[a:b + len(spec.output_end)][:60]!r} does not tokenise as a "
                             f"spliced output would (tokenise output spans on their own)")
        mask[at:at + len(span)] = [0] * len(span)
        pos, start = at + len(span), b + len(spec.output_end)


def resolve(name):
    """--tools NAME: a built-in tool or module:function -> f(call_text) -> str."""
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            f = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--tools {name!r}: cannot load it ({e})") from None
        return f
    if name not in TOOLS:
        raise ValueError(f"--tools: unknown tool {name!r} (built in: {', '.join(TOOLS)}; or module:function)")
    return TOOLS[name]


class Tools:
    """A tool with its spec, and what the rollout loop needs from it: finding a finished call at the end
    of a row's text, running a step's calls together, and the output as token ids."""

    def __init__(self, fn, spec=ToolSpec(), tok=None):
        self.fn, self.spec, self.tok = fn, spec, tok
        self._end_ids = None

    def call_text(self, text):
        """The call a row's text has just finished (it ends with call_end), or None."""
        s = self.spec
        if not text.endswith(s.call_end):
            return None
        start = text.rfind(s.call_start, 0, len(text) - len(s.call_end))
        if start < 0 or text.rfind(s.output_end, 0, len(text)) > start:
            return None
        return text[start + len(s.call_start):len(text) - len(s.call_end)]

    def run(self, calls, pool):
        """[call text] -> [(output text, error?, timed out?)], all calls at once on the pool, each bounded by
        spec.timeout (a call still running then is abandoned to its thread and answered with an error)."""
        futures = [pool.submit(self.fn, c) for c in calls]
        out = []
        for f in futures:
            try:
                r = f.result(timeout=self.spec.timeout)
                out.append((str(r), str(r).startswith("error"), False))
            except FutureTimeout:
                out.append((f"error: timed out after {self.spec.timeout:g} s", True, True))
            except Exception as e:   # a tool's fault is the row's output, not the run's end
                out.append((f"error: {type(e).__name__}: {e}"[:200], True, False))
        return out

    def output_ids(self, text):
        """The spliced tokens: output_start + text + output_end, tokenised with special-token text split
        (tool output never becomes structure: no EOS, no role token), at most max_output_tokens."""
        s, tok = self.spec, self.tok
        enc = lambda t: tok(t, add_special_tokens=False, split_special_tokens=True).input_ids
        head, body, tail = enc(s.output_start), enc(text), enc(s.output_end)
        room = s.max_output_tokens - len(head) - len(tail)
        if len(body) > room:
            cut = enc(CUT)
            body = body[:max(room - len(cut), 0)] + cut
        return head + body + tail

    def pool(self):
        return ThreadPoolExecutor(self.spec.workers)
