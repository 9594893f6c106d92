"""Executors: adapters that act on the workers and return data (they store nothing, decide nothing).

`lmstack.nodes.ansible` runs lmstack's playbooks (node facts) through ansible-runner.
"""
