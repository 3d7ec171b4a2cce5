# Chapter 08: the attention weights of one head under a sliding window, as a T x T heatmap.
# Data: 08_sliding_window/window_mask.dat, lines "query key weight" (NaN where the window masks), one block
# per query.
load 'style.gp'

data = datadir.'/08_sliding_window/window_mask.dat'
stats data using 1 nooutput
T = int(STATS_max) + 1
stats data using ($3 == $3 ? $1 - $2 : 1/0) nooutput
W = int(STATS_max) + 1

set title sprintf('Sliding-window weights of one head (T = %d, W = %d)', T, W)
set xlabel 'key position j (token)'
set ylabel 'query position i (token)'
set cblabel 'attention weight'
set size ratio -1
set xrange [-0.5 : T - 0.5]
set yrange [T - 0.5 : -0.5]
step = T <= 12 ? 1 : (T <= 32 ? 2 : T / 8)
set xtics 0, step
set ytics 0, step
set cbrange [0 : *]
set tics front
set grid noxtics noytics
set border 15
unset key

# Masked cells (after the query, or W or more tokens before it) are left out; the frame's fill shows there.
set object 1 rectangle from graph 0, 0 to graph 1, 1 behind fillcolor rgb masked_colour fillstyle solid noborder
set label 1 'masked: j > i' at graph 0.97, graph 0.93 right front textcolor rgb '#4d4d4d'
set label 2 'masked: i - j >= W' at graph 0.03, graph 0.07 left front textcolor rgb '#4d4d4d'

plot data using 2 : 1 : 3 with image pixels
