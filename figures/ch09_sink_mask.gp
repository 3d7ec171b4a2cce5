# Chapter 09: the sink + window mask, as a T x T map: kept sink columns, the window band, masked cells.
# Data: 09_sink_tokens/sink_mask.dat, lines "query key value" (2 a sink, 1 the window, NaN masked), one block
# per query.
load 'style.gp'

data = datadir.'/09_sink_tokens/sink_mask.dat'
stats data using 1 nooutput
T = int(STATS_max) + 1

set title sprintf('Kept sinks + sliding window (T = %d)', T)
set xlabel 'key position j (token)'
set ylabel 'query position i (token)'
set size ratio -1
set xrange [-0.5 : T - 0.5]
set yrange [T - 0.5 : -0.5]
step = T <= 12 ? 1 : (T <= 32 ? 2 : T / 8)
set xtics 0, step
set ytics 0, step
set cbrange [0.5 : 2.5]
set cbtics ('window' 1, 'sink' 2)
set palette defined (0.5 '#9ecae1', 1.5 '#9ecae1', 1.5 '#d95f02', 2.5 '#d95f02')
set tics front
set grid noxtics noytics
set border 15
unset key
set object 1 rectangle from graph 0, 0 to graph 1, 1 behind fillcolor rgb masked_colour fillstyle solid noborder
plot data using 2 : 1 : 3 with image pixels
