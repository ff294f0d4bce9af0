"""Test support shared by every suite: broker fixtures (brokers), test plans (plans, cases),
the pipeline harness (pipeline) and the one polling helper (polling)."""
