"""The Flower ServerApp: builds the strategy named by `defense`, evaluates MA/ASR, writes results."""
