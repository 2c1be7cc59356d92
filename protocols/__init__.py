"""Retrieval protocols of later work, beside the original's TIRG protocol (``test_retrieval``): CIRR's
(``protocols.cirr``) and the standard Fashion IQ protocol (``protocols.fashioniq``); ``protocols.base`` holds what
every protocol shares (the ``Protocol`` interface, fp32 cosine similarities, single-target ranks, recall@k).
``test_retrieval.PROTOCOLS`` maps a task's ``protocol`` name to its ``Protocol``."""
