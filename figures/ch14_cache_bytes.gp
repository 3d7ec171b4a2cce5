# Chapter 14: bytes one sequence holds against context for the two delta-rule hybrids (Qwen3-Next-80B-A3B: 36
# Gated DeltaNet states + 12 GQA layers; Kimi-Linear-48B-A3B: 20 KDA states + 7 MLA layers), MiniMax-M1's
# lightning hybrid and the all-GQA Llama-3.1-70B.
# Data: 14_delta_rule/cache_bytes.dat, "context qwen3_next kimi_linear minimax_m1 llama70b" (second line: names).
load 'style.gp'

data = datadir.'/14_delta_rule/cache_bytes.dat'
set title "Bytes one sequence holds against context (bf16): fixed states + growing cache"
set xlabel 'context (tokens)'
set ylabel 'bytes per sequence'
set logscale xy 2
set xrange [1024 : 4194304]
set xtics ('1K' 1024, '4K' 4096, '16K' 16384, '64K' 65536, '256K' 262144, '1M' 1048576, '4M' 4194304)
set yrange [2**24 : 2**41]
set ytics ('16 MiB' 2**24, '64 MiB' 2**26, '256 MiB' 2**28, '1 GiB' 2**30, '4 GiB' 2**32, '16 GiB' 2**34, \
           '64 GiB' 2**36, '256 GiB' 2**38, '1 TiB' 2**40)
set key bottom right font ',10'
plot data using 1 : 5 with linespoints linetype 2 title 'Llama-3.1-70B (80 GQA layers)', \
     data using 1 : 4 with linespoints linetype 4 title 'MiniMax-M1 (70 lightning + 10 GQA)', \
     data using 1 : 2 with linespoints linetype 1 title 'Qwen3-Next-80B-A3B (36 Gated DeltaNet + 12 gated GQA)', \
     data using 1 : 3 with linespoints linetype 3 title 'Kimi-Linear-48B-A3B (20 KDA + 7 MLA)'
