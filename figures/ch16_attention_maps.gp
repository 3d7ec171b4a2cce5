# Chapter 16: the attention weights of head 0 of the first, middle and last layer of SmolLM2-135M-Instruct on
# the chat prompt, side by side (the program writes the maps of layers 0, 15 and 29, the first, middle and last).
# Data: 16_a_real_model/attention_maps.dat, lines "map query key weight"; one blank line after each query,
# two after each map.
load 'style.gp'

data = datadir.'/16_a_real_model/attention_maps.dat'
stats data using 2 nooutput
T = int(STATS_max) + 1

set terminal svg enhanced size 1200,440 font 'sans-serif,13' background rgb 'white'
set output outfile
set multiplot layout 1, 3 title sprintf('Head 0 on the chat prompt (%d tokens): what each query reads', T)
set xlabel 'key position'
set ylabel 'query position'
set size ratio -1
set xrange [-0.5 : T - 0.5]
set yrange [T - 0.5 : -0.5]
set cbrange [0 : 1]
set tics front
set grid noxtics noytics
unset key
unset colorbox
do for [m = 0:2] {
  set title sprintf('layer %d', m == 0 ? 0 : (m == 1 ? 15 : 29))
  plot data index m using 3 : 2 : ($3 > $2 ? NaN : $4) with image pixels
}
unset multiplot
