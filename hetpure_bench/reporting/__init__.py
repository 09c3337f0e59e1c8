"""What results become: leaderboards, report tables, plots and the report, paired comparisons,
and the published numbers rows are set beside. Reads the result store; runs no attack
(the image grid's panels excepted: they attack the few images they draw)."""
