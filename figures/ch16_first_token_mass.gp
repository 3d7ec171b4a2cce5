# Chapter 16: the mean attention weight each head of SmolLM2-135M-Instruct puts on the first token of the chat
# prompt (queries from position 8 on), as a layer x head heatmap.
# Data: 16_a_real_model/first_token_mass.dat, lines "layer head weight", a blank line after each layer.
load 'style.gp'

data = datadir.'/16_a_real_model/first_token_mass.dat'
stats data using 1 nooutput
layers = int(STATS_max) + 1
stats data using 2 nooutput
heads = int(STATS_max) + 1

set title 'Weight on the first token, per layer and head (SmolLM2-135M, chat prompt)'
set xlabel 'head'
set ylabel 'layer'
set cblabel 'mean weight on token 0'
set xrange [-0.5 : heads - 0.5]
set yrange [layers - 0.5 : -0.5]
set xtics 0, 1
set ytics 0, 3
set cbrange [0 : 1]
set tics front
set grid noxtics noytics
unset key
plot data using 2 : 1 : 3 with image pixels
