"""The federated task both apps share: config, datasets and partitions, models, attacks, metrics.

``clipfed_strategy`` never imports this package: the defence works with any user model and task.
"""
