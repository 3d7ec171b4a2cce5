# Chapter 02: the causal attention weights of every head of one layer, side by side: the heads see the same
# tokens and attend differently. Data: 02_multi_head_attention/head_weights.dat, "head query key weight".
load 'style.gp'

data = datadir.'/02_multi_head_attention/head_weights.dat'
stats data using 1 nooutput
H = int(STATS_max) + 1
stats data using 2 nooutput
T = int(STATS_max) + 1

set terminal svg enhanced size 220 * H + 120, 330 font 'sans-serif,12' background rgb 'white'
set output outfile
set multiplot layout 1, H margins 0.07, 0.9, 0.2, 0.84 spacing 0.03 title sprintf('Causal attention weights of the %d heads of one layer (T = %d)', H, T) font 'sans-serif,15'
set size ratio -1
set xrange [-0.5 : T - 0.5]
set yrange [T - 0.5 : -0.5]
set cbrange [0 : 1]
set tics front
set grid noxtics noytics
set border 15
set xtics 0, (T <= 10 ? 2 : T / 4)
set ytics 0, (T <= 10 ? 2 : T / 4)
unset colorbox
unset key
set object 1 rectangle from graph 0, 0 to graph 1, 1 behind fillcolor rgb masked_colour fillstyle solid noborder
do for [h = 0 : H - 1] {
  set title sprintf('head %d', h) font 'sans-serif,13'
  set xlabel 'key j'
  if (h == 0) { set ylabel 'query i' } else { unset ylabel }
  if (h == H - 1) { set colorbox user origin screen 0.92, 0.2 size screen 0.015, 0.6; set cblabel 'weight' }
  plot data index h using 3 : 2 : ($3 > $2 ? NaN : $4) with image pixels
}
unset multiplot
