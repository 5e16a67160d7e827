"""A dense reward for tests, loaded by grpo.py through --reward-funcs toy_rewards:digit_fraction."""


def digit_fraction(prompts, completions, completion_ids=None, **kw):
    """Fraction of the completion's characters that are digits (0 for an empty completion)."""
    return [sum(ch.isdigit() for ch in c) / len(c) if c else 0.0 for c in completions]
