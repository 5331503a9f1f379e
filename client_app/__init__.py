"""The Flower ClientApp: benign clients train locally; malicious ones implant a backdoor."""
