"""Deployment: least-privilege RabbitMQ users, and stacks generated from a plan.

``users`` (roles, permissions, definitions), ``secrets`` (passwords in mode-600 files),
``stack`` (the processes a plan needs), ``compose`` and ``k8s`` (the generated projects).
docs/deploy.md is the guide.
"""
