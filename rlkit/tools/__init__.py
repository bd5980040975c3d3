"""Tools and code execution for rollouts and rewards: the sandboxed executor (:mod:`rlkit.tools.sandbox`)."""
