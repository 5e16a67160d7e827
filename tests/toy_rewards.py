"""A dense reward for tests, loaded by grpo.py through --reward-funcs toy_rewards:digit_fraction."""


def digit_fraction(prompts, completions, completion_ids=None, **kw):
    """Fraction of the completion's characters that are digits (0 for an empty completion)."""
    return [sum(ch.isdigit() for ch in c) / len(c) if c else 0.0 for c in completions]


def first_char(prompts, completions, completion_ids=None, **kw):
    """The code of the completion's first character / 128 (0 for an empty completion): any two samples of
    an untrained model almost surely differ, so every group has a spread of rewards, hence a gradient."""
    return [ord(c[0]) / 128 if c else 0.0 for c in completions]


def counted(prompts, completions, completion_ids=None, **kw):
    """digit_fraction, returned with counts to log (as code_reward returns runs and timeouts): one
    'calls' per call, and 'scored': the number of completions."""
    import rewards
    return rewards.Rewards(digit_fraction(prompts, completions), {"calls": 1, "scored": len(completions)})


def starts_with(prompts, completions, answer=None, **kw):
    """1 if the completion starts with the row's `answer` (a non-empty string), else 0."""
    return [1.0 if a and c.startswith(a) else 0.0 for c, a in zip(completions, answer)]


def short_correct(max_new_tokens, alpha=0.5):
    """The README's "Fork it" maker, as written there: accuracy scaled down by the completion's length."""
    import rewards

    def reward(prompts, completions, completion_ids, answer=None, **kw):
        right = rewards.accuracy_reward(prompts, completions, answer)
        return [None if r is None else r * (1 - alpha * len(ids) / max_new_tokens)
                for r, ids in zip(right, completion_ids)]
    return reward


def opens_easy(prompts, completions, completion_ids=None, **kw):
    """1 for a completion that opens with "[E", else 0: the mode an untrained model never picks by itself."""
    return [1.0 if c.startswith("[E") else 0.0 for c in completions]
