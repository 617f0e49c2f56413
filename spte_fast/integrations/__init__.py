"""spte_fast inside other machines: ``unicorn`` (spte_fast as the MMU of the unicorn CPU
emulator; the ``[unicorn]`` extra), with the C programs it runs in ``routines``."""
