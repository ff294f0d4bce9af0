"""Test support shared by every suite: broker fixtures (brokers), test plans (plans, cases),
the pipeline harness (pipeline), the one polling helper (polling) and the synthetic worker
(synthetic, a test and benchmark double)."""
