# Chapter 19: bytes one decode step reads against context, for every mechanism of the chapter's table (one
# sequence, all layers, bf16 unless the row says otherwise).
# Data: 19_choosing_a_cache/decode_reads.dat, "context" then one column per row of the table, named in its header.
load 'style.gp'

data = datadir.'/19_choosing_a_cache/decode_reads.dat'
set terminal svg enhanced size 1080,600 font 'sans-serif,13' background rgb 'white'
set output outfile
stats data using 1 nooutput
columns = STATS_columns
set title 'Bytes one decode step reads against context (one sequence, all layers)'
set xlabel 'context (tokens)'
set ylabel 'bytes read per decode step'
set logscale xy 2
set xrange [1024 : STATS_max]
set xtics ('1K' 1024, '4K' 4096, '16K' 16384, '64K' 65536, '256K' 262144, '1M' 1048576, '4M' 4194304)
set yrange [2**22 : 2**40]
set ytics ('4 MiB' 2**22, '16 MiB' 2**24, '64 MiB' 2**26, '256 MiB' 2**28, '1 GiB' 2**30, '4 GiB' 2**32, \
           '16 GiB' 2**34, '64 GiB' 2**36, '256 GiB' 2**38, '1 TiB' 2**40)
set key outside right top font ',10' spacing 1.05
# Six colours, then the same colours dashed, then dotted: every row keeps its own line.
plot for [i = 2 : columns] data using 1 : i with lines linetype 1 + (i - 2) % 6 dashtype 1 + (i - 2) / 6 \
     title columnheader(i)
