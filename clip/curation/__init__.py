"""Data curation: embed a pool of shards once, then filter it into DataComp subset files.

    embeddings.py    the per-shard embedding files (format, atomic writes, reading a directory back)
    embed.py         computing them: image/text embeddings and the CLIP score of every sample
    score_filter.py  CLIP-score filtering (threshold or top fraction)
    text_filter.py   caption filtering by a word list (ImageNet synset lemmas), optional English filter
    clusters.py      k-means over embeddings (faiss when installed, else torch)
    image_filter.py  DataComp's image-based filter: keep clusters nearest to a target set
    dedup.py         semantic deduplication within clusters (SemDeDup)
    subsets.py       set operations on subset files and a per-shard summary
    metaclip.py      MetaCLIP balancing: metadata matching (Aho-Corasick), entry counts, the seeded keep rule

Every filter returns uids; `clip.data.subset.write_subset` writes them in DataComp's format, which
`data.subset=PATH` trains on; MetaCLIP's balance file is also what `data.balance=PATH` balances
online with (docs/curation.md).
"""
